"""Stage-1 training loss (Rombach et al. 2022, Sec. 3.1 / App. G; Esser et al. 2021, Eq. 4-7):

  L = nll + regulariser + lambda * disc_factor * L_G   (autoencoder's gradient)
    + disc_factor * L_D                                (discriminator's gradient)

nll = (|x - x_rec| + w_p * LPIPS(x, x_rec)) / exp(logvar) + logvar, summed over pixels, averaged
over the batch (CompVis `LPIPSWithDiscriminator`). `logvar` is a learnable scalar; it must be in the
autoencoder optimizer's param group (AutoencoderTask.param_groups does that; CompVis never gave it to
an optimizer, so it stayed at its init).

ONE forward, ONE backward: L_G runs the discriminator with *detached parameters*, L_D sees *detached
images*, so backward() of the sum gives the autoencoder exactly d(generator loss) and the
discriminator exactly d(L_D), with no second encode/decode (taming recomputes it: +31 % FLOPs).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ldm.losses.discriminator import NLayerDiscriminator
from ldm.losses.lpips import build_lpips
from ldm.metrics.image import lpips_metric_name
from ldm.models.autoencoder import DiagonalGaussianDistribution


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(x_rec))]) (Lim & Ye 2017; taming `hinge_d_loss`)."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_weight(nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """lambda = ||grad_L nll|| / (||grad_L L_G|| + 1e-4) on the decoder's last layer L (Esser et al. 2021, Eq. 7),
    clamped to [0, 1e4] and detached (a weight, not a path for gradients)."""
    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()


class AutoencoderLoss(nn.Module):
    """loss(inputs, reconstructions, regularization, step, last_layer) -> (one scalar, logs).

    `regularization` is what the autoencoder's forward returns beside the reconstruction: a
    DiagonalGaussianDistribution (KL-reg) or the quantiser's dict (VQ-reg).
    Weights: kl_weight multiplies the per-image KL sum (paper 1e-6); codebook_weight multiplies the VQ
    loss, which is a mean over latent elements, scaled by the pixel count so that it keeps taming's
    mean(nll) : mean(codebook) balance under our per-image-sum nll. disc_start: first step of the GAN.
    pixel_loss: "l1" (paper) or "l2" (squared error, as in the SD VAE's ft-MSE fine-tune; on the demo's
    flat-background shapes L1 stayed near 18 dB for 1500 steps where L2 reached 24 dB by step 1000; docs/demo.md).
    lpips_pretrained: the published LPIPS (torchvision's pretrained backbone, fetched if not cached, else the
    run stops saying where to put it) or, with False, a seeded random backbone, logged as `lpips_random`.
    """

    def __init__(self, disc_start: int, kl_weight: float = 1e-6, codebook_weight: float = 1.0,
                 pixel_weight: float = 1.0, perceptual_weight: float = 1.0, disc_weight: float = 0.5,
                 disc_factor: float = 1.0, disc_num_layers: int = 3, disc_ndf: int = 64,
                 logvar_init: float = 0.0, lpips_net: str = "vgg", pixel_loss: str = "l1",
                 lpips_pretrained: bool = True):
        super().__init__()
        if pixel_loss not in ("l1", "l2"):
            raise ValueError(f"pixel_loss must be 'l1' (paper) or 'l2' (squared error), got {pixel_loss!r}")
        self.pixel_loss = pixel_loss
        self.disc_start, self.kl_weight, self.codebook_weight = disc_start, kl_weight, codebook_weight
        self.pixel_weight, self.perceptual_weight = pixel_weight, perceptual_weight
        self.disc_weight, self.disc_factor = disc_weight, disc_factor
        self.lpips = build_lpips(lpips_net, pretrained=lpips_pretrained) if perceptual_weight > 0 else None
        self.lpips_name = lpips_metric_name(self.lpips)
        self.discriminator = NLayerDiscriminator(input_nc=3, ndf=disc_ndf, n_layers=disc_num_layers)
        self.logvar = nn.Parameter(torch.tensor(float(logvar_init)))

    def regularization_term(self, regularization, pixels_per_image: int) -> tuple[torch.Tensor, dict]:
        if isinstance(regularization, DiagonalGaussianDistribution):
            kl = regularization.kl().mean()
            return self.kl_weight * kl, {"kl": kl}
        codebook = regularization["loss"]
        logs = {"codebook": codebook, "codebook_usage": regularization["usage"],
                "perplexity": regularization["perplexity"]}
        return self.codebook_weight * codebook * pixels_per_image, logs

    def forward(self, inputs: torch.Tensor, reconstructions: torch.Tensor, regularization, step: int,
                last_layer: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        batch = inputs.shape[0]
        # NHWC like the decoder's output: the PatchGAN / LPIPS convs are several times faster on CPU.
        inputs = inputs.contiguous(memory_format=torch.channels_last)
        error = inputs - reconstructions
        rec = self.pixel_weight * (error.abs() if self.pixel_loss == "l1" else error.square())
        lpips = torch.zeros((), device=inputs.device)
        if self.lpips is not None:
            lpips = self.lpips(inputs.float(), reconstructions.float())  # (B,1,1,1), differentiable in x_rec
            rec = rec + self.perceptual_weight * lpips
        nll = (rec / torch.exp(self.logvar) + self.logvar).sum() / batch
        reg_loss, reg_logs = self.regularization_term(regularization, inputs[0].numel())

        # adopt_weight in CompVis: the GAN is off (factor 0) before disc_start.
        disc_factor = self.disc_factor if step >= self.disc_start else 0.0
        g_loss = d_weight = torch.zeros((), device=inputs.device)
        logs: dict[str, torch.Tensor] = {}
        if disc_factor > 0:
            frozen = {name: p.detach() for name, p in self.discriminator.named_parameters()}
            g_loss = -functional_call(self.discriminator, frozen, (reconstructions,)).mean()
            if self.training and torch.is_grad_enabled() and last_layer.requires_grad:
                d_weight = adaptive_weight(nll, g_loss, last_layer) * self.disc_weight
            logits_real = self.discriminator(inputs.detach())
            logits_fake = self.discriminator(reconstructions.detach())
            d_loss = disc_factor * hinge_discriminator_loss(logits_real, logits_fake)
            logs.update(logits_real=logits_real.mean().detach(), logits_fake=logits_fake.mean().detach())
        else:
            # Zero gradient for every discriminator parameter at no cost, so DDP (which expects a
            # gradient for every parameter) needs no find_unused_parameters before disc_start.
            d_loss = sum(p.sum() for p in self.discriminator.parameters()) * 0.0

        generator_loss = nll + reg_loss + d_weight * disc_factor * g_loss
        loss = generator_loss + d_loss
        logs[self.lpips_name] = lpips.mean()
        logs.update(loss=loss, rec=error.abs().mean(), nll=nll,
                    g=g_loss, d=d_loss, d_weight=d_weight, disc_factor=torch.tensor(disc_factor),
                    logvar=self.logvar, **reg_logs)
        return loss, {name: value.detach() for name, value in logs.items()}
