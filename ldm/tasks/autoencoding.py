"""Stage-1 task: train a KL- or VQ-regularised autoencoder with L1 + LPIPS + PatchGAN (Sec. 3.1).

Implements the task contract of docs/architecture.md for ldm/training/loop.py.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

from ldm.losses.autoencoder import AutoencoderLoss
from ldm.modules.ae_blocks import AttnBlock, ResnetBlock
from ldm.metrics import lpips_distance, psnr, ssim
from ldm.tasks.base import RunContext, Task
from ldm.visualize import Panel, side_by_side


class AutoencoderTask(Task):
    # LPIPS is a fixed function (pretrained, or a seeded random backbone): rebuilt, not checkpointed.
    frozen_prefixes = ("loss.lpips.",)

    def __init__(self, autoencoder: nn.Module, loss: AutoencoderLoss, sample_posterior: bool = True):
        super().__init__()
        # sample_posterior (CompVis's `sample_posterior`): decode z ~ q(z|x) in training (the paper) or its
        # mean. The posterior starts at unit variance, whose noise drowns the latent code early on (on the
        # demo shapes it halved the read-back accuracy at 1500 steps); short runs decode the mean (KL unchanged).
        self.autoencoder, self.loss, self.sample_posterior = autoencoder, loss, sample_posterior

    def forward(self, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images = batch["image"]
        # ONE encode/decode feeds both the generator and the discriminator terms (see AutoencoderLoss).
        reconstructions, regularization = self.autoencoder(images, sample=self.sample_posterior)
        return self.loss(images, reconstructions, regularization, step, self.autoencoder.last_layer())

    def step_phase(self, step: int) -> bool:
        """The discriminator's forwards and the adaptive weight's gradients start at disc_start."""
        return step >= self.loss.disc_start and self.loss.disc_factor > 0

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        # logvar belongs to the generator side: it scales the nll the autoencoder minimises.
        return {"autoencoder": [*self.autoencoder.parameters(), self.loss.logvar],
                "discriminator": list(self.loss.discriminator.parameters())}

    def ema_target(self) -> None:
        return None

    def blocks(self) -> list[nn.Module]:
        """The autoencoder's ResnetBlocks and attention blocks (not LPIPS: fixed, and its activations are
        few; not the small discriminator)."""
        return [m for m in self.autoencoder.modules() if isinstance(m, (ResnetBlock, AttnBlock))]

    @torch.no_grad()
    def reconstruct(self, batch: dict) -> torch.Tensor:
        """D(E(x)) from the posterior mean, clamped to the data range [-1, 1]."""
        return self.autoencoder(batch["image"], sample=False)[0].clamp(-1, 1)

    @torch.no_grad()
    def visualize(self, batch: dict) -> dict[str, Panel]:
        """Each reconstruction beside its input, captioned with its PSNR."""
        images = batch["image"]
        reconstructions = self.reconstruct(batch)
        captions = [c for p in psnr(images, reconstructions).tolist() for c in ("input", f"reconstruction {p:.1f} dB")]
        return {"reconstructions": Panel(side_by_side(images, reconstructions), captions, group=2)}

    @torch.no_grad()
    def evaluate(self, batch: dict) -> dict[str, float]:
        images = batch["image"]
        reconstructions, regularization = self.autoencoder(images, sample=False)
        reconstructions = reconstructions.clamp(-1, 1)
        metrics = {"psnr": psnr(images, reconstructions).mean().item(),
                   "ssim": ssim(images, reconstructions).mean().item()}
        if self.loss.lpips is not None:
            # `lpips`, or `lpips_random` when the backbone is random (model.task.loss.lpips_pretrained=false)
            metrics[self.loss.lpips_name] = lpips_distance(self.loss.lpips, images, reconstructions).mean().item()
        if isinstance(regularization, dict):  # VQ: how much of the codebook the data uses
            metrics["codebook_usage"] = float(regularization["usage"])
            metrics["perplexity"] = float(regularization["perplexity"])
        return metrics

    def on_train_end(self, run: RunContext) -> None:
        """Stage 1 ends by measuring latent statistics (scale_factor = 1/std) and writing the one file stage 2
        loads (`model.first_stage.ckpt`). Every rank reads the same batches (the sums are all-reduced), so
        the statistics are identical everywhere."""
        from ldm.models.autoencoder import save_autoencoder

        with torch.random.fork_rng():  # keep the RNG state the final checkpoint stores
            self.latent_statistics(run.statistics_batches())
        if run.is_main:
            path = run.run_dir / "autoencoder.safetensors"
            save_autoencoder(self.autoencoder, path, run.task_config["autoencoder"], sample_posterior=self.sample_posterior)
            print(f"[ldm] wrote {path} (scale_factor {float(self.autoencoder.scale_factor):.4f})")
        run.barrier()

    @torch.no_grad()
    def latent_statistics(self, batches: Iterable[dict]) -> dict[str, torch.Tensor]:
        """Set scale_factor = 1/std(z) over all latent elements (LDM Sec. 4.3.2 / App. G: unit-variance
        latents for the diffusion model) and per-channel latent_mean / latent_std, from the latents
        stage 2 will see (posterior samples for KL, or the mean with `sample_posterior: false`). Sums are
        all-reduced under torch.distributed."""
        ae = self.autoencoder
        channels = ae.latent_channels
        device = ae.scale_factor.device
        sums = torch.zeros(3, channels, dtype=torch.float64, device=device)  # count, sum, sum of squares
        for batch in batches:
            z = ae.encode_latent(batch["image"].to(device), sample=self.sample_posterior).double()
            per_channel = z.transpose(0, 1).reshape(channels, -1)
            sums[0] += per_channel.shape[1]
            sums[1] += per_channel.sum(1)
            sums[2] += per_channel.pow(2).sum(1)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
        if sums[0, 0] == 0:
            raise ValueError("latent_statistics: got no batches")
        count, total, total_sq = sums
        mean = total / count
        std = (total_sq / count - mean ** 2).clamp(min=0).sqrt()
        overall_mean = total.sum() / count.sum()
        overall_std = (total_sq.sum() / count.sum() - overall_mean ** 2).clamp(min=0).sqrt()
        ae.scale_factor.fill_(float(1.0 / overall_std))
        ae.latent_mean.copy_(mean.float())
        ae.latent_std.copy_(std.float())
        return {"scale_factor": ae.scale_factor.clone(), "latent_mean": ae.latent_mean.clone(),
                "latent_std": ae.latent_std.clone()}
