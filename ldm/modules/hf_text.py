"""Stable-Diffusion-style frozen text encoders (CLIP / T5 / BERT family) through `transformers`,
loaded from a local directory, a diffusers pipeline layout, or the Hugging Face cache (offline by
default). The conditioner interface is the one in ldm/modules/encoders.py."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from ldm.modules.conditioning import Conditioner, _captions_with_nulls
from ldm.modules.tokenizer import _check_captions, warn_truncation

# model_type (from config.json) -> transformers class. Text-only classes avoid loading CLIP's vision
# tower or T5's decoder; everything else (BERT, MiniLM, ...) goes through AutoModel.
HF_MODEL_CLASSES = {"clip": "CLIPTextModel", "clip_text_model": "CLIPTextModel",
                    "t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}
# Stable Diffusion v1 ran CLIP on the padded prompt without an attention mask (CLIP is causal, so real
# tokens are unaffected; only the pad positions differ). Matching that keeps SD weights usable.
HF_PASS_ATTENTION_MASK = {"clip": False, "clip_text_model": False}
# Final norm applied after taking an earlier layer ("penultimate", SD-2's choice / "clip skip").
# Candidate submodule paths: transformers v5 flattened CLIPTextModel (no `text_model.` level).
_CLIP_NORM = ("final_layer_norm", "text_model.final_layer_norm")
_T5_NORM = ("encoder.final_layer_norm",)
HF_FINAL_NORM = {"clip": _CLIP_NORM, "clip_text_model": _CLIP_NORM, "t5": _T5_NORM, "mt5": _T5_NORM,
                 "umt5": _T5_NORM}


def _last_hidden_state(encoder: "FrozenHFTextEncoder", out) -> torch.Tensor:
    return out.last_hidden_state


def _final_norm(model: nn.Module, model_type: str) -> nn.Module:
    modules = dict(model.named_modules())
    paths = HF_FINAL_NORM.get(model_type, ())
    found = [modules[p] for p in paths if p in modules]
    if paths and not found:
        raise RuntimeError(f"FrozenHFTextEncoder: no final norm at {paths} in this {model_type} model")
    return found[0] if found else nn.Identity()  # post-LN models (BERT) need none


def _penultimate(encoder: "FrozenHFTextEncoder", out) -> torch.Tensor:
    return _final_norm(encoder.model, encoder.model_type)(out.hidden_states[-2])


HF_OUTPUTS = {"last_hidden_state": _last_hidden_state, "penultimate": _penultimate}


def is_pipeline_layout(source: str) -> bool:
    """A diffusers pipeline (e.g. stabilityai/stable-diffusion-2-1) keeps the text encoder and its
    tokenizer in `text_encoder/` and `tokenizer/`, with `model_index.json` at the top."""
    from huggingface_hub import try_to_load_from_cache

    if Path(source).is_dir():
        return (Path(source) / "model_index.json").is_file()
    try:
        return isinstance(try_to_load_from_cache(source, "model_index.json"), str)
    except ValueError:  # not a valid repo id: nothing cached under it
        return False


def resolve_pretrained(name_or_path: str, local_files_only: bool = True, subfolder: str = ""):
    """Return (path or hub id, AutoConfig). Raises FileNotFoundError naming every place looked at."""
    from huggingface_hub.constants import HF_HUB_CACHE
    from transformers import AutoConfig

    path = Path(name_or_path).expanduser()
    source = str(path) if path.is_dir() else name_or_path
    try:
        config = AutoConfig.from_pretrained(source, subfolder=subfolder, local_files_only=local_files_only)
        return source, config
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"FrozenHFTextEncoder: cannot load {name_or_path!r} (subfolder={subfolder!r}): no model directory "
            f"at {path.resolve()} and not found in the Hugging Face cache {HF_HUB_CACHE} "
            f"(local_files_only={local_files_only}, HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', 'unset')}). "
            f"Cause: {err}") from err


class FrozenHFTextEncoder(Conditioner):
    """Stable-Diffusion-style frozen text encoder (CLIP / T5 / BERT) from a local path or the HF cache.

    Never trained: eval mode is kept even under `.train()`, parameters have requires_grad False and
    the forward runs under no_grad. Its weights do appear in state_dict() under `model.`.

    A diffusers pipeline directory / repo is recognised (model_index.json) and read from its
    `text_encoder/` and `tokenizer/` subfolders unless `subfolder` / `tokenizer_subfolder` say otherwise.
    Note: diffusers' SD-2 text encoder already has the last OpenCLIP layer removed (23 layers), so its
    `last_hidden_state` IS SD-2's penultimate-layer context; `output="penultimate"` is for full models.
    """

    def __init__(self, name_or_path: str, max_length: int = 77, output: str = "last_hidden_state",
                 local_files_only: bool = True, pass_attention_mask: bool | None = None,
                 subfolder: str | None = None, tokenizer_subfolder: str | None = None,
                 caption_key: str = "caption"):
        super().__init__()
        import transformers

        if output not in HF_OUTPUTS:
            raise ValueError(f"FrozenHFTextEncoder: output={output!r}, expected one of {sorted(HF_OUTPUTS)}")
        pipeline = subfolder is None and is_pipeline_layout(str(Path(name_or_path).expanduser()))
        if subfolder is None:
            subfolder = "text_encoder" if pipeline else ""
        if tokenizer_subfolder is None:
            tokenizer_subfolder = "tokenizer" if pipeline else subfolder
        source, config = resolve_pretrained(name_or_path, local_files_only, subfolder)
        self.model_type = config.model_type
        model_class = getattr(transformers, HF_MODEL_CLASSES.get(config.model_type, "AutoModel"))
        self.model = model_class.from_pretrained(source, subfolder=subfolder, local_files_only=local_files_only)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(source, subfolder=tokenizer_subfolder,
                                                                    local_files_only=local_files_only)
        positions = getattr(self.model.config, "max_position_embeddings", None)  # None: relative (T5)
        if positions is not None and max_length > positions:
            raise ValueError(f"FrozenHFTextEncoder: max_length={max_length} exceeds {name_or_path!r}'s "
                             f"max_position_embeddings={positions}")
        self.max_length, self.output, self.caption_key = max_length, output, caption_key
        self.pass_attention_mask = (HF_PASS_ATTENTION_MASK.get(self.model_type, True)
                                    if pass_attention_mask is None else pass_attention_mask)
        self.model.eval().requires_grad_(False)

    @property
    def context_dim(self) -> int:
        return self.model.config.hidden_size

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.eval()  # frozen: dropout stays off whatever the task's mode
        return self

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """captions -> (tokens (B, max_length, hidden), attention mask (B, max_length) bool)."""
        captions = _check_captions(captions, "FrozenHFTextEncoder.encode")
        lengths = [len(ids) for ids in self.tokenizer(captions)["input_ids"]]
        dropped = [n - self.max_length for n in lengths if n > self.max_length]
        if dropped:
            warn_truncation(dropped, self.max_length, "FrozenHFTextEncoder.encode")
        tok = self.tokenizer(captions, padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        device = next(self.model.parameters()).device
        ids, mask = tok["input_ids"].to(device, non_blocking=True), tok["attention_mask"].to(device, non_blocking=True)
        with torch.no_grad():
            out = self.model(input_ids=ids, attention_mask=mask if self.pass_attention_mask else None,
                             output_hidden_states=self.output != "last_hidden_state")
            return HF_OUTPUTS[self.output](self, out), mask.bool()

    def forward(self, batch: dict, drop: torch.Tensor | None = None, latent_size=None) -> dict:
        captions = _captions_with_nulls(batch, self.caption_key, drop, type(self).__name__)
        return {"context": self.encode(captions)[0]}
