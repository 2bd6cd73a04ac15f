"""Vector quantisation layer of the VQ-regularised autoencoder (Rombach et al. 2022, Sec. 3.1;
van den Oord et al. 2017, Eq. 3), with codebook usage / perplexity and a dead-code restart.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class VectorQuantizer(nn.Module):
    """z (B, C, H, W) -> (z_q, {"loss", "usage", "perplexity", "indices"}).

    loss = ||sg[z] - e||^2 + beta * ||z - sg[e]||^2  (VQ-VAE Eq. 3; taming's `legacy=True` swapped beta
    onto the codebook term, we use the paper's form). Gradients pass straight through to z.

    Dead codes: a code not chosen for `restart_after` consecutive training steps is re-initialised to a
    random encoder output of the current batch (0 disables). Under torch.distributed the usage counts
    are all-reduced, so every rank marks the same codes dead, and rank 0's new rows are broadcast so the
    codebook stays identical on all ranks (DDP only syncs gradients, not in-place parameter edits).
    """

    def __init__(self, n_embed: int, embed_dim: int, beta: float = 0.25, restart_after: int = 200):
        super().__init__()
        self.n_embed, self.embed_dim, self.beta, self.restart_after = n_embed, embed_dim, beta, restart_after
        self.embedding = nn.Embedding(n_embed, embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)  # taming's init
        # Consecutive training steps each code went unused; persistent so a resumed run keeps counting.
        self.register_buffer("steps_unused", torch.zeros(n_embed, dtype=torch.long))

    @torch.no_grad()
    def nearest_codes(self, flat: torch.Tensor) -> torch.Tensor:
        """Index of the closest codebook row for each row of `flat` (N, C); ||z||^2 - 2 z.e + ||e||^2 in fp32."""
        flat, codebook = flat.float(), self.embedding.weight.float()
        distances = (flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codebook.t() + codebook.pow(2).sum(1)[None])
        return distances.argmin(dim=1)

    @torch.no_grad()
    def restart_dead_codes(self, flat: torch.Tensor) -> int:
        """Re-initialise codes unused for `restart_after` steps from rows of `flat`; returns how many."""
        if self.restart_after <= 0:
            return 0
        dead = (self.steps_unused >= self.restart_after).nonzero().squeeze(1)
        if dead.numel() == 0:
            return 0
        picks = torch.randint(0, flat.shape[0], (dead.numel(),), device=flat.device)
        new_rows = flat[picks].to(self.embedding.weight.dtype).contiguous()
        if _distributed():
            dist.broadcast(new_rows, src=0)
        self.embedding.weight.data[dead] = new_rows
        self.steps_unused[dead] = 0
        return int(dead.numel())

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        b, c, h, w = z.shape
        if c != self.embed_dim:
            raise ValueError(f"VectorQuantizer: input has {c} channels, codebook has embed_dim {self.embed_dim}")
        flat = z.permute(0, 2, 3, 1).reshape(-1, c)
        if self.training:
            # Restart before quantising, so revived codes are used (and trained) from this very step
            # and the codebook is never edited after the graph has read it.
            self.restart_dead_codes(flat.detach())
        indices = self.nearest_codes(flat.detach())
        z_q = self.embedding(indices).view(b, h, w, c).permute(0, 3, 1, 2)
        loss = F.mse_loss(z_q, z.detach()) + self.beta * F.mse_loss(z, z_q.detach())
        z_q = z + (z_q - z).detach()  # straight-through estimator

        counts = torch.bincount(indices, minlength=self.n_embed)
        if self.training:
            # Only in training: every rank runs this forward in lock-step there. In eval (e.g. a
            # rank-0-only decode for samples) a collective would hang the other ranks.
            if _distributed():
                dist.all_reduce(counts)
            with torch.no_grad():
                self.steps_unused.add_(1).masked_fill_(counts > 0, 0)
        probs = counts.float() / counts.sum().clamp(min=1)
        perplexity = torch.exp(-(probs * torch.log(probs.clamp(min=1e-10))).sum())
        usage = (counts > 0).float().mean()  # fraction of the codebook used by this batch (global in training)
        return z_q, {"loss": loss, "usage": usage, "perplexity": perplexity, "indices": indices.view(b, h, w)}
