"""Stage 2 (paper §3.2-3.3): a time-conditional UNet trained on the latents of a frozen autoencoder,
conditioned through τ_θ by cross-attention (tokens) and/or concatenation (spatial maps).

    L_LDM = E_{z=s·E(x), ε, t} ‖ε − ε_θ(z_t, t, τ_θ(y))‖²      (paper eq. 2-3; x0/v targets, min-SNR optional)
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

import torch.nn.functional as F

from ldm.diffusion import draws
from ldm.diffusion.objective import add_noise, diffusion_loss, offset_noise
from ldm.diffusion.schedule import NoiseSchedule
from ldm.modules.attention import SpatialTransformer
from ldm.modules.conditioning import Conditioner, sample_drop_mask
from ldm.modules.encoders import TransformerBlock
from ldm.modules.unet_blocks import AttentionBlock, ResBlock
from ldm.sampling import SAMPLERS, cfg_model_fn, img2img_timesteps, known_region_model_fn
from ldm.tasks.base import RunContext, Task
from ldm.visualize import Panel


class LatentDiffusionTask(Task):
    """Owns the frozen first stage, the conditioner τ_θ and the UNet ε_θ.

    `unet` is a partial (`_partial_: true` in the config): the facts it needs — latent channels,
    concat channels and the token width — come from the first stage and the conditioner, not from YAML.
    A conditioner that needs the first stage (inpainting's `MaskedImageConcat`) is a partial too.
    """

    generates_images = True
    trains_on_latents = True

    def __init__(self, unet: Callable[..., nn.Module], conditioner: nn.Module | Callable[..., nn.Module],
                 first_stage: nn.Module,
                 schedule: dict | None = None, parameterization: str = "eps", loss_weighting: str = "uniform",
                 min_snr_gamma: float = 5.0, offset_noise: float = 0.0, ucg_rate: float = 0.1,
                 sample_posterior: bool | None = None, sampler: str = "ddim", sample_steps: int = 25,
                 guidance_scale: float = 1.5):
        super().__init__()
        self.first_stage = first_stage.eval().requires_grad_(False)
        if not isinstance(conditioner, nn.Module):
            conditioner = conditioner(first_stage=self.first_stage)
        if not isinstance(conditioner, Conditioner):
            raise TypeError(f"LatentDiffusionTask: the conditioner {type(conditioner).__name__} does not implement "
                            f"ldm.modules.conditioning.Conditioner (the facts the task and its callers read)")
        self.conditioner = conditioner
        latent = first_stage.latent_channels
        self.unet = unet(in_channels=latent + conditioner.concat_channels, out_channels=latent,
                         context_dim=conditioner.context_dim)
        self.schedule = NoiseSchedule.from_config(schedule or {})
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler={sampler!r}: choose one of {sorted(SAMPLERS)}")
        self.parameterization, self.loss_weighting, self.min_snr_gamma = parameterization, loss_weighting, min_snr_gamma
        # Encode the way the decoder was trained (posterior samples or the mean; the stage-1 file says
        # which): a decoder trained on the mean never saw the posterior noise (std ~1 against a latent
        # std of 3.1 in the demo), and scale_factor was measured on the same kind of latents.
        if sample_posterior is None:
            sample_posterior = getattr(first_stage, "sample_posterior", True)
        self.offset_noise, self.ucg_rate, self.sample_posterior = offset_noise, ucg_rate, sample_posterior
        self.sampler, self.sample_steps, self.guidance_scale = sampler, sample_steps, guidance_scale
        self._null_context = None  # a frozen conditioner's tokens for the null caption (latent cache)
        trainable = any(p.requires_grad for p in conditioner.parameters())
        # Frozen parts are rebuilt from their own files, not stored in every checkpoint.
        self.frozen_prefixes = ("first_stage.",) + (() if trainable or _has_extra_state(conditioner)
                                                     else ("conditioner.",))

    def train(self, mode: bool = True):
        super().train(mode)
        self.first_stage.eval()  # frozen: no dropout / quantizer restarts, ever
        return self

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        params = list(self.unet.parameters()) + [p for p in self.conditioner.parameters() if p.requires_grad]
        return {"unet": params}

    def ema_target(self) -> nn.Module:
        return self.unet

    def shard_units(self) -> list[nn.Module]:
        """FSDP units: each UNet block, then the UNet (its embeddings and output head), then a trainable
        conditioner. The frozen first stage stays whole on every rank (no gradients, no optimizer state)."""
        unet = self.unet
        units = [*unet.input_blocks, unet.middle_block, *unet.output_blocks, unet]
        if any(p.requires_grad for p in self.conditioner.parameters()):
            units.append(self.conditioner)
        return units

    def blocks(self) -> list[nn.Module]:
        """The UNet's ResBlocks, SpatialTransformers and AttentionBlocks, and a trainable text encoder's
        transformer layers (a frozen conditioner and the first stage run without gradients)."""
        blocks = [m for m in self.unet.modules() if isinstance(m, (ResBlock, SpatialTransformer, AttentionBlock))]
        if any(p.requires_grad for p in self.conditioner.parameters()):
            blocks += [m for m in self.conditioner.modules() if isinstance(m, TransformerBlock)]
        return blocks

    def on_train_start(self, run: RunContext) -> None:
        """A jointly trained text encoder needs a tokenizer fitted on the dataset's captions before its
        embedding means anything. Rank 0 fits it and writes run_dir/tokenizer.json; the other ranks read
        that file, so every rank holds the same vocabulary. On resume the checkpoint's tokenizer replaces it."""
        encoder = self.conditioner
        if encoder.is_fitted:  # no tokenizer to fit, or one restored already
            return
        from ldm.data.webdataset import read_captions
        from ldm.modules.tokenizer import BPETokenizer

        path = run.run_dir / "tokenizer.json"
        if run.is_main and not path.exists():
            run.run_dir.mkdir(parents=True, exist_ok=True)
            captions = read_captions(run.data.shards, run.data.caption_field)
            if not captions:
                raise ValueError(f"no captions found in {run.data.shards} (caption_field={run.data.caption_field})")
            tmp = path.with_suffix(".tmp")
            tmp.write_text(encoder.fit_tokenizer(captions).to_json())
            tmp.replace(path)
        run.barrier()
        encoder.set_tokenizer(BPETokenizer.from_json(path.read_text()))

    # -- latents ------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """z = scale_factor · E(x), the first stage frozen and without gradients."""
        z = self.first_stage.encode_latent(images, sample=self.sample_posterior and self.training)
        return z.float() * self.first_stage.scale_factor

    @torch.no_grad()
    def encode_fp32(self, images: torch.Tensor) -> torch.Tensor:
        """`encode` outside autocast (sampling inputs: img2img, inpainting): an fp16 VAE overflows."""
        with torch.autocast(images.device.type, enabled=False):
            return self.encode(images.float())

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """x = D(z / scale_factor), in float32: an fp16 decoder is a known source of NaN / black images."""
        with torch.autocast(z.device.type, enabled=False):
            return self.first_stage.decode(z.float() / self.first_stage.scale_factor).clamp(-1, 1)

    def denoise(self, z_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        if "concat" in cond:
            z_t = torch.cat([z_t, cond["concat"].to(z_t.dtype)], dim=1)
        return self.unet(z_t, t, context=cond.get("context"))

    # -- training -----------------------------------------------------------------------------------
    @torch.no_grad()
    def latents(self, batch: dict) -> torch.Tensor:
        """z of a training batch: `encode(batch["image"])`, or the same from a latent cache's posterior
        moments (ldm/data/latent_cache.py): z ~ N(mean, exp(logvar)) drawn as DiagonalGaussianDistribution
        does (one contiguous randn, so the same seed gives the same z), or the mean."""
        if "latent_mean" not in batch:
            # contiguous, as the cached one: randn_like(z) follows z's strides, and the convolutions may return
            # channels-last ones (oneDNN on CPU does), so the same seed would give other noise per element
            return self.encode(batch["image"]).contiguous()
        z = batch["latent_mean"].float()
        if self.sample_posterior and self.training and "latent_logvar" in batch:
            z = z + torch.exp(0.5 * batch["latent_logvar"].float()) * draws.randn(z.shape, device=z.device)
        return z * self.first_stage.scale_factor

    def condition(self, batch: dict, drop: torch.Tensor | None, latent_size: tuple[int, int]) -> dict:
        """τ_θ(y); a frozen conditioner's cached tokens (batch["context"]) stand in for running it, with its
        own output for the null caption in the rows `drop` selects (classifier-free guidance training)."""
        if "context" not in batch:
            return self.conditioner(batch, drop, latent_size=latent_size)
        context = batch["context"].float()
        if drop is None:
            return {"context": context}
        if self._null_context is None:  # frozen: computed once
            row = {k: v[:1] for k, v in batch.items() if isinstance(v, list)}
            null = self.conditioner(row, torch.ones(1, dtype=torch.bool), latent_size=latent_size)["context"]
            self._null_context = null.detach().float()
        null = self._null_context.to(context.device)
        return {"context": torch.where(drop.to(context.device).view(-1, 1, 1), null, context)}

    def forward(self, batch: dict, step: int) -> tuple[torch.Tensor, dict]:
        z = self.latents(batch)
        b = z.shape[0]
        noise = offset_noise(draws.randn(z.shape, device=z.device, dtype=z.dtype), self.offset_noise)
        t = draws.randint(0, self.schedule.num_timesteps, (b,), device=z.device)
        # The drop mask is drawn on the host: text conditioners need it there, and reading a device mask
        # would be a host sync every step (the others copy it over without blocking).
        drop = sample_drop_mask(b, self.ucg_rate, device="cpu") if self.training else None
        cond = self.condition(batch, drop, latent_size=tuple(z.shape[-2:]))
        out = self.denoise(add_noise(self.schedule, z, noise, t), t, cond)
        loss = diffusion_loss(self.schedule, out, z, noise, t, self.parameterization, self.loss_weighting,
                              self.min_snr_gamma).mean()
        return loss, {"loss": loss.detach()}

    # -- sampling -----------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, batch: dict, *, sampler: str | None = None, steps: int | None = None,
               guidance_scale: float | None = None, generator: torch.Generator | None = None,
               latent_size: tuple[int, int] | None = None, noise: torch.Tensor | None = None,
               init_image: torch.Tensor | None = None, strength: float = 1.0, **opts) -> torch.Tensor:
        """Images `(B,3,H,W)` in [-1,1] for the conditions in `batch` (captions, labels, low-res images),
        starting from `noise` (x_T) when given, else from N(0, I) drawn with `generator`.

        * batch["negative_caption"]: the unconditional branch of classifier-free guidance encodes these
          captions instead of the null one (negative prompts; "" is the null caption).
        * `init_image` (B,3,H,W): img2img (SDEdit, Meng et al. 2022): encode it, noise the latent to
          t ≈ strength·T with `noise`, and run the sampler's remaining timesteps from there.
        * batch["mask"] (B,1,H,W), 1 = inpaint, with batch["image"]: latent cells that hold no masked pixel
          are pinned to E(image) at every step (`known_region_model_fn`) and at the end, with any model;
          an inpainting model (`MaskedImageConcat`) is also conditioned on the masked image.
        """
        n = _batch_size(batch)
        device = next(self.unet.parameters()).device
        sampler, steps = sampler or self.sampler, steps or self.sample_steps
        if sampler not in SAMPLERS:
            raise ValueError(f"sample: sampler={sampler!r}; choose one of {sorted(SAMPLERS)}")
        if latent_size is None:
            f = self.first_stage.downsample_factor
            if "image" not in batch:
                raise ValueError("sample: pass latent_size=(h, w) when the batch holds no image to take it from")
            latent_size = tuple(s // f for s in batch["image"].shape[-2:])
        cond = self.conditioner(batch, None, latent_size=latent_size)
        scale = self.guidance_scale if guidance_scale is None else guidance_scale
        if cond:
            uncond = self._unconditional(batch, n, device, latent_size) if scale != 1.0 else cond
            model_fn = cfg_model_fn(lambda x, t, c: self.denoise(x, t, c), cond, uncond, scale)
        else:
            model_fn = lambda x, t: self.denoise(x, t, {})  # noqa: E731
        shape = (n, self.first_stage.latent_channels, *latent_size)
        if noise is None:
            noise = torch.randn(shape, generator=generator, device=generator.device if generator else device)
        elif tuple(noise.shape) != shape:
            raise ValueError(f"sample: noise has shape {tuple(noise.shape)}, expected {shape}")
        x_T = noise.to(device)
        keep = None
        if "mask" in batch:
            mask = torch.as_tensor(batch["mask"]).to(device, torch.float32)
            z_known = self.encode_fp32(batch["image"].to(device))
            # a latent cell is kept only if none of its pixels is to be inpainted
            keep = F.adaptive_max_pool2d(mask, latent_size) < 0.5
            model_fn = known_region_model_fn(model_fn, self.schedule, z_known, keep, self.parameterization)
        if init_image is not None:
            timesteps = img2img_timesteps(self.schedule.num_timesteps, steps, strength,
                                          **{k: opts.pop(k) for k in ("spacing", "offset") if k in opts})
            z0 = self.encode_fp32(init_image.to(device)).expand(shape)
            x_T = add_noise(self.schedule, z0, x_T, timesteps[:1].to(device).expand(n))
            opts.update(timesteps=timesteps, steps=None)
        else:
            opts.update(steps=steps)
        z = SAMPLERS[sampler](model_fn, x_T, self.schedule, parameterization=self.parameterization,
                              generator=generator, **opts)
        if keep is not None:
            z = torch.where(keep, z_known.to(z.dtype), z)
        return self.decode(z)

    def _unconditional(self, batch: dict, n: int, device, latent_size) -> dict:
        """The unconditional branch of CFG: the negative captions when given, else every row dropped."""
        if "negative_caption" in batch:
            negatives = list(batch["negative_caption"])
            if len(negatives) != n:
                raise ValueError(f"sample: {len(negatives)} negative captions for a batch of {n}")
            return self.conditioner({**batch, "caption": negatives}, None, latent_size=latent_size)
        return self.conditioner(batch, torch.ones(n, dtype=torch.bool, device=device), latent_size=latent_size)

    @torch.no_grad()
    def visualize(self, batch: dict) -> dict[str, Panel]:
        """Samples for the first 16 held-out conditions, each captioned with what it was asked for,
        and the held-out images those conditions came from."""
        n = min(16, _batch_size(batch))
        batch = {k: v[:n] for k, v in batch.items()}
        if self.conditioner.needs_mask:  # inpainting: show the masked inputs and inpaint them
            batch["mask"] = self.conditioner.masks(batch)
        generator = torch.Generator(batch["image"].device).manual_seed(0)  # same noise every time: comparable grids
        captions = self.condition_captions(batch)
        images = {"samples": Panel(self.sample(batch, generator=generator), captions),
                  "references": Panel(batch["image"], captions)}
        if "mask" in batch:
            images["masked"] = Panel(batch["image"] * (batch["mask"] < 0.5), captions)
        return images

    def condition_captions(self, batch: dict) -> list[str] | None:
        """One line per sample naming its condition (prompt and/or class); None when unconditional."""
        parts = []
        for m in self.conditioner.parts():
            if m.caption_key is not None:
                parts.append([str(c) for c in batch[m.caption_key]])
            if m.label_key is not None:
                parts.append([f"class {int(y)}" for y in batch[m.label_key]])
        return [" | ".join(p) for p in zip(*parts)] if parts else None

    @torch.no_grad()
    def evaluate(self, batch: dict) -> dict[str, float]:
        """Held-out diffusion loss at fixed noise and timesteps (comparable across evaluations)."""
        g = torch.Generator(batch["image"].device).manual_seed(0)
        z = self.encode(batch["image"])
        noise = torch.randn(z.shape, generator=g, device=z.device)
        t = torch.randint(0, self.schedule.num_timesteps, (z.shape[0],), generator=g, device=z.device)
        cond = self.conditioner(batch, None, latent_size=tuple(z.shape[-2:]))
        out = self.denoise(add_noise(self.schedule, z, noise, t), t, cond)
        return {"loss": float(diffusion_loss(self.schedule, out, z, noise, t, self.parameterization).mean())}


def _batch_size(batch: dict) -> int:
    for key in ("caption", "label", "image", "lowres"):
        if key in batch:
            return len(batch[key])
    raise ValueError("batch has none of caption / label / image / lowres: nothing to condition on or count")


def _has_extra_state(module: nn.Module) -> bool:
    return any(type(m).get_extra_state is not nn.Module.get_extra_state for m in module.modules())
