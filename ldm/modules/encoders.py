"""Conditioning encoders τ_θ (paper §3.3): y -> tokens for cross-attention and/or spatial maps to concat.

Every conditioner is an `nn.Module` chosen in config by `_target_` and called the same way:

    cond = conditioner(batch, drop=None, latent_size=(h, w))  # -> {"context": (B,M,d), "concat": (B,C,h,w)}

* `batch` is the data pipeline's dict ("caption", "label", "image", optional "lowres", ...).
* `drop` is a BoolTensor (B,): rows where it is True get the NULL condition. The task draws it with
  `sample_drop_mask(B, ucg_rate)` for classifier-free-guidance training (Ho & Salimans 2022) and
  passes `torch.ones(B, dtype=bool)` for the unconditional branch when sampling.
* `latent_size` is the latent's spatial size; only spatial (concat) conditioners use it.
* `context_dim` (None when no tokens) and `concat_channels` (0 when none) are what the task hands to
  the UNet: `context_dim=cond.context_dim`, `in_channels=latent_channels + cond.concat_channels`.
  They and the other facts callers read (`caption_key`, `label_key`, `image_key`, `needs_mask`, the
  tokenizer hooks) are declared once, with defaults, in `ldm.modules.conditioning.Conditioner`.

Semantic synthesis and pixel-space inpainting use the concat path too: put the maps in the batch and use
`SpatialConcat(channels={"mask": 1, "masked_image": 3})` (`in_channels = latent_channels + 4`). The paper's
inpainting model (§4.5) and SD-inpainting concatenate E(masked image) instead: `MaskedImageConcat`, a
partial in config that the task hands its frozen first stage (`in_channels = 2·latent_channels + 1`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.data.masks import masked_image, masks_for_keys
from ldm.modules.conditioning import Conditioner, _batch_item, _captions_with_nulls, _check_drop, _zero_dropped
from ldm.modules.hf_text import FrozenHFTextEncoder  # noqa: F401  (saved runs' configs name it here)
from ldm.modules.tokenizer import MIN_VOCAB_SIZE, BPETokenizer


# ---------------------------------------------------------------------------------------- helpers
def resize_to_latent(x: torch.Tensor, size: tuple[int, int], upsample_mode: str = "bicubic") -> torch.Tensor:
    """Resize a (B,C,H,W) map to the latent's (h, w). Area-average when shrinking (no aliasing),
    `upsample_mode` when growing; bicubic overshoot is clamped back into the data range [-1, 1]."""
    size = tuple(int(s) for s in size)
    if tuple(x.shape[-2:]) == size:
        return x
    if x.shape[-2] > size[0] and x.shape[-1] > size[1]:
        return F.interpolate(x, size=size, mode="area")
    y = F.interpolate(x, size=size, mode=upsample_mode)
    return y.clamp(-1.0, 1.0) if upsample_mode == "bicubic" else y


# ------------------------------------------------------------------- jointly trained text encoder
class TransformerBlock(nn.Module):
    """Pre-LN transformer block (bidirectional self-attention + GELU MLP)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"TransformerBlock: dim={dim} is not divisible by heads={heads}")
        self.heads, self.dropout = heads, dropout
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        b, m, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, m, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        # Padding keys are masked so a caption's features do not depend on how much padding follows it.
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :],
                                           dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(a.transpose(1, 2).reshape(b, m, d))
        return x + self.mlp(self.norm2(x))


class TransformerTextEncoder(Conditioner):
    """The paper's τ_θ for text (§3.3, §4.3.1): BPE tokens -> transformer, trained jointly with the UNet.

    The tokenizer is fitted lazily (`fit_tokenizer(captions)`, called by the task before training)
    and stored in the state_dict as `_extra_state` (a uint8 tensor of its JSON), so a safetensors
    checkpoint of the task holds everything needed to encode a prompt later.

    `depth: 0` keeps no transformer layers: each word stays its own key for the UNet's cross-attention.
    Trained from scratch on the diffusion loss, layers mix the words early, and in the demo the words that
    only matter locally ("left", "square") were washed out (docs/demo.md).
    """

    def __init__(self, vocab_size: int = 1024, max_length: int = 77, dim: int = 512, depth: int = 6,
                 heads: int = 8, mlp_ratio: float = 4.0, dropout: float = 0.0, caption_key: str = "caption"):
        super().__init__()
        if depth < 0:
            raise ValueError(f"TransformerTextEncoder: depth={depth} must be >= 0 (0: the positioned word "
                             f"embeddings, layer-normed, are the context)")
        if vocab_size < MIN_VOCAB_SIZE:  # fail at build time, not when the tokenizer is fitted
            raise ValueError(f"TransformerTextEncoder: vocab_size={vocab_size} is below {MIN_VOCAB_SIZE}, the "
                             f"byte-level BPE's 256-byte alphabet plus <pad>/<bos>/<eos>")
        self.vocab_size, self.max_length, self.dim, self.caption_key = vocab_size, max_length, dim, caption_key
        self.tokenizer: BPETokenizer | None = None
        self.token_embedding = nn.Embedding(vocab_size, dim)
        self.position_embedding = nn.Parameter(torch.empty(max_length, dim))
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, mlp_ratio, dropout) for _ in range(depth))
        self.final_norm = nn.LayerNorm(dim)
        # GPT-2/BERT initialisation scale for embeddings.
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding, std=0.02)

    @property
    def context_dim(self) -> int:
        return self.dim

    @property
    def is_fitted(self) -> bool:
        return self.tokenizer is not None

    def fit_tokenizer(self, captions: list[str], **train_kwargs) -> BPETokenizer:
        self.tokenizer = BPETokenizer.train(captions, self.vocab_size, **train_kwargs)
        return self.tokenizer

    def set_tokenizer(self, tokenizer: BPETokenizer) -> None:
        self.tokenizer = tokenizer

    # -- the tokenizer travels inside state_dict() (and so inside safetensors checkpoints)
    def get_extra_state(self) -> torch.Tensor:
        if self.tokenizer is None:
            return torch.zeros(0, dtype=torch.uint8)
        return torch.frombuffer(bytearray(self.tokenizer.to_json().encode("utf-8")), dtype=torch.uint8).clone()

    def set_extra_state(self, state: torch.Tensor) -> None:
        if state.numel() == 0:
            self.tokenizer = None
            return
        tokenizer = BPETokenizer.from_json(bytes(state.cpu().to(torch.uint8).tolist()).decode("utf-8"))
        if tokenizer.vocab_size > self.vocab_size:
            raise ValueError(f"TransformerTextEncoder: the stored tokenizer has {tokenizer.vocab_size} tokens, "
                             f"more than this encoder's vocab_size={self.vocab_size}")
        self.tokenizer = tokenizer

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """captions -> (tokens (B, max_length, dim), mask (B, max_length) True on BOS..EOS)."""
        if self.tokenizer is None:
            raise RuntimeError("TransformerTextEncoder: the tokenizer is not fitted; call "
                               "fit_tokenizer(captions) before training, or load a checkpoint that has one")
        ids, mask = self.tokenizer.encode(captions, self.max_length)
        device = self.position_embedding.device
        ids, mask = ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)  # no stream sync
        x = self.token_embedding(ids) + self.position_embedding
        for block in self.blocks:
            x = block(x, mask)
        return self.final_norm(x), mask

    def forward(self, batch: dict, drop: torch.Tensor | None = None, latent_size=None) -> dict:
        captions = _captions_with_nulls(batch, self.caption_key, drop, type(self).__name__)
        return {"context": self.encode(captions)[0]}


# ------------------------------------------------------------------------------ class labels
class ClassEmbedder(Conditioner):
    """Class label -> one token (B, 1, dim) for cross-attention (CompVis `ClassEmbedder`, cin models).
    The null condition is an extra learned index `num_classes`, trained by the CFG dropout."""

    def __init__(self, num_classes: int, dim: int, label_key: str = "label"):
        super().__init__()
        self.num_classes, self.dim, self.label_key = num_classes, dim, label_key
        self.embedding = nn.Embedding(num_classes + 1, dim)

    @property
    def context_dim(self) -> int:
        return self.dim

    def forward(self, batch: dict, drop: torch.Tensor | None = None, latent_size=None) -> dict:
        labels = _batch_item(batch, self.label_key, "ClassEmbedder")
        labels = torch.as_tensor(labels).to(self.embedding.weight.device).long().view(-1)
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"ClassEmbedder: batch[{self.label_key!r}] has labels outside "
                             f"[0, {self.num_classes}): min {labels.min().item()}, max {labels.max().item()}")
        drop = _check_drop(drop, labels.shape[0], "ClassEmbedder")
        if drop is not None:
            labels = torch.where(drop.to(labels.device, non_blocking=True), torch.full_like(labels, self.num_classes),
                                 labels)
        return {"context": self.embedding(labels)[:, None, :]}


# ------------------------------------------------------------------------------ spatial concat
def _latent_size_or_error(latent_size, where: str):
    if latent_size is None:
        raise ValueError(f"{where}: pass latent_size=(h, w), the latent's spatial size")
    return latent_size


class LowResConcat(Conditioner):
    """×`factor` super-resolution (`ldm_sr`, paper §4.4): the low-res image, resized to the latent
    size, is concatenated to z_t. Uses batch["lowres"] when present, else area-downsamples
    batch["image"] by `factor`. If the call gives no latent_size it is image size / `latent_factor`
    (the autoencoder's downsampling factor). Null condition: zeros."""

    def __init__(self, factor: int = 4, latent_factor: int | None = None, channels: int = 3,
                 image_key: str = "image", lowres_key: str = "lowres", upsample_mode: str = "bicubic"):
        super().__init__()
        self.factor, self.latent_factor, self.channels = factor, latent_factor, channels
        self.image_key, self.lowres_key, self.upsample_mode = image_key, lowres_key, upsample_mode

    @property
    def concat_channels(self) -> int:
        return self.channels

    def lowres(self, batch: dict) -> torch.Tensor:
        if self.lowres_key in batch:
            return batch[self.lowres_key]
        image = _batch_item(batch, self.image_key, "LowResConcat")
        h, w = image.shape[-2:]
        if h % self.factor or w % self.factor:
            raise ValueError(f"LowResConcat: batch[{self.image_key!r}] size {h}x{w} is not divisible by "
                             f"factor={self.factor}")
        return F.interpolate(image, size=(h // self.factor, w // self.factor), mode="area")

    def forward(self, batch: dict, drop: torch.Tensor | None = None, latent_size=None) -> dict:
        lowres = self.lowres(batch)
        if lowres.dim() != 4 or lowres.shape[1] != self.channels:
            raise ValueError(f"LowResConcat: low-res image must be (B, {self.channels}, h, w), "
                             f"got {tuple(lowres.shape)}")
        if latent_size is None and self.latent_factor is not None:
            latent_size = [s * self.factor // self.latent_factor for s in lowres.shape[-2:]]
        latent_size = _latent_size_or_error(latent_size, "LowResConcat (or set latent_factor)")
        concat = resize_to_latent(lowres, latent_size, self.upsample_mode)
        return {"concat": _zero_dropped(concat, _check_drop(drop, lowres.shape[0], "LowResConcat"))}


class SpatialConcat(Conditioner):
    """Generic concat conditioner: batch maps (masks, masked images, semantic maps, encoded latents)
    resized to the latent size and stacked in the order of `channels` ({key: channel count}).
    Null condition: zeros."""

    def __init__(self, channels: dict[str, int], upsample_mode: str = "nearest"):
        super().__init__()
        self.channels, self.upsample_mode = dict(channels), upsample_mode

    @property
    def concat_channels(self) -> int:
        return sum(self.channels.values())

    def forward(self, batch: dict, drop: torch.Tensor | None = None, latent_size=None) -> dict:
        latent_size = _latent_size_or_error(latent_size, "SpatialConcat")
        maps = []
        for key, c in self.channels.items():
            x = _batch_item(batch, key, "SpatialConcat")
            if x.dim() != 4 or x.shape[1] != c:
                raise ValueError(f"SpatialConcat: batch[{key!r}] must be (B, {c}, H, W), got {tuple(x.shape)}")
            maps.append(resize_to_latent(x.float(), latent_size, self.upsample_mode))
        concat = torch.cat(maps, dim=1)
        return {"concat": _zero_dropped(concat, _check_drop(drop, concat.shape[0], "SpatialConcat"))}


class MaskedImageConcat(Conditioner):
    """Inpainting (paper §4.5; SD-inpainting layout): concat [mask at latent size, s·E(masked image)] to z_t,
    so the UNet has `in_channels = 2·c + 1`. `mask_first: false` gives latent-diffusion's own order
    [E(masked image), mask] (its `inpainting_big` model); true is SD-inpainting's (and diffusers').

    batch["mask"] (B, 1, H, W), 1 = inpaint, is used when present (sampling); otherwise masks are drawn from
    the samples' keys (ldm/data/masks.py), deterministic in (key, `mask_seed`). The masked image has the
    hole set to 0 (mid-grey), as in SD. Null condition: zeros. In config this is a partial
    (`_partial_: true`): the task supplies `first_stage`, which is held, not registered (the task owns it).
    """

    needs_mask = True

    def __init__(self, first_stage: nn.Module, mask_first: bool = True, mask_seed: int = 0,
                 mask_kinds: tuple[str, ...] = ("box", "stroke"), image_key: str = "image", mask_key: str = "mask"):
        super().__init__()
        self._first_stage = (first_stage,)  # a tuple: not a submodule, so not in this module's state_dict
        self.latent_channels = first_stage.latent_channels
        self.mask_first, self.mask_seed, self.mask_kinds = mask_first, mask_seed, tuple(mask_kinds)
        self.image_key, self.mask_key = image_key, mask_key

    @property
    def concat_channels(self) -> int:
        return self.latent_channels + 1

    def masks(self, batch: dict) -> torch.Tensor:
        image = _batch_item(batch, self.image_key, "MaskedImageConcat")
        if self.mask_key in batch:
            mask = torch.as_tensor(batch[self.mask_key]).to(image.device, torch.float32)
            if mask.shape != (image.shape[0], 1, *image.shape[-2:]):
                raise ValueError(f"MaskedImageConcat: batch[{self.mask_key!r}] must be (B, 1, H, W) = "
                                 f"{(image.shape[0], 1, *image.shape[-2:])}, got {tuple(mask.shape)}")
            return mask
        if "key" not in batch:
            raise ValueError("MaskedImageConcat: the batch has no 'mask'; random masks need the samples' 'key's "
                             f"(got image {tuple(image.shape)} and no keys)")
        return masks_for_keys(batch["key"], tuple(image.shape[-2:]), self.mask_seed, self.mask_kinds).to(image.device)

    def forward(self, batch: dict, drop: torch.Tensor | None = None, latent_size=None) -> dict:
        image, mask = _batch_item(batch, self.image_key, "MaskedImageConcat"), self.masks(batch)
        first_stage = self._first_stage[0]
        with torch.no_grad():
            z = first_stage.encode_latent(masked_image(image, mask), sample=False).float() * first_stage.scale_factor
        latent_size = tuple(latent_size or z.shape[-2:])
        if tuple(z.shape[-2:]) != latent_size:
            raise ValueError(f"MaskedImageConcat: the masked image encodes to {tuple(z.shape[-2:])}, "
                             f"not the latent size {latent_size}")
        small_mask = F.interpolate(mask, size=latent_size, mode="nearest")  # as SD-inpainting
        concat = torch.cat([small_mask, z] if self.mask_first else [z, small_mask], dim=1)
        return {"concat": _zero_dropped(concat, _check_drop(drop, concat.shape[0], "MaskedImageConcat"))}


# ------------------------------------------------------------------------------ none / several
class Unconditional(Conditioner):
    """No conditioning (LDM on CelebA-HQ, FFHQ, LSUN, paper §4.1)."""

    def forward(self, batch: dict, drop: torch.Tensor | None = None, latent_size=None) -> dict:
        return {}


class Composite(Conditioner):
    """Hybrid conditioning (paper §3.3): several conditioners at once. Token sets are joined along the
    token axis (all must share context_dim), spatial maps along channels. `drop` drops all together,
    so the null branch of classifier-free guidance is fully unconditional."""

    def __init__(self, conditioners: dict[str, Conditioner]):
        super().__init__()
        plain = [name for name, c in conditioners.items() if not isinstance(c, Conditioner)]
        if plain:
            raise TypeError(f"Composite: members {plain} are not ldm.modules.conditioning.Conditioner subclasses")
        self.conditioners = nn.ModuleDict(dict(conditioners))
        fitting = [type(p).__name__ for p in self.parts() if not p.is_fitted]
        if len(fitting) > 1:
            raise ValueError(f"Composite: at most one member may fit a tokenizer on the captions, got {fitting}")
        dims = {n: c.context_dim for n, c in self.conditioners.items() if c.context_dim is not None}
        if len(set(dims.values())) > 1:
            raise ValueError(f"Composite: token conditioners disagree on context_dim: {dims}")
        self._context_dim = next(iter(dims.values()), None)

    @property
    def context_dim(self) -> int | None:
        return self._context_dim

    @property
    def concat_channels(self) -> int:
        return sum(c.concat_channels for c in self.conditioners.values())

    def parts(self) -> list[Conditioner]:
        return [p for c in self.conditioners.values() for p in c.parts()]

    @property
    def needs_mask(self) -> bool:
        return any(p.needs_mask for p in self.parts())

    def masks(self, batch: dict) -> torch.Tensor:
        return next(p for p in self.parts() if p.needs_mask).masks(batch) if self.needs_mask else super().masks(batch)

    @property
    def is_fitted(self) -> bool:
        return all(p.is_fitted for p in self.parts())

    def fit_tokenizer(self, captions: list[str]):
        """Fits the member that has a tokenizer (one at most: the run keeps one tokenizer.json)."""
        unfitted = [p for p in self.parts() if not p.is_fitted]
        return unfitted[0].fit_tokenizer(captions) if unfitted else None

    def set_tokenizer(self, tokenizer) -> None:
        for p in self.parts():
            if not p.is_fitted:
                p.set_tokenizer(tokenizer)

    def forward(self, batch: dict, drop: torch.Tensor | None = None, latent_size=None) -> dict:
        parts = [c(batch, drop, latent_size=latent_size) for c in self.conditioners.values()]
        joined = {}
        for key in ("context", "concat"):  # tokens: (B, M, d) join on M; maps: (B, C, h, w) join on C
            tensors = [p[key] for p in parts if key in p]
            if tensors:
                joined[key] = torch.cat(tensors, dim=1)
        return joined
