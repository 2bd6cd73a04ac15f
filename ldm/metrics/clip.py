"""CLIP score (Hessel et al. 2021): 100 · max(cos(E_image(x), E_text(caption)), 0) per image, the
convention of torchmetrics' `CLIPScore` and of the SD/Imagen papers' "CLIP score" (w = 100 instead of
CLIPScore's 2.5). The CLIP model is read from a local path only (a Hugging Face `CLIPModel` folder with
its tokenizer); nothing is downloaded.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

# OpenAI CLIP's image normalisation (CLIPImageProcessor's image_mean / image_std)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _features(output) -> torch.Tensor:
    # transformers 5 returns a ModelOutput whose pooler_output is the projected embedding; 4.x a tensor
    return output.pooler_output if hasattr(output, "pooler_output") else output  # by transformers version


@torch.no_grad()
def clip_score(model, pixel_values: torch.Tensor, input_ids: torch.Tensor,
               attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) CLIP scores of CLIP-preprocessed images against tokenised captions, pairwise by row."""
    image = F.normalize(_features(model.get_image_features(pixel_values=pixel_values)).float(), dim=-1)
    text = F.normalize(_features(model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)).float(),
                       dim=-1)
    return 100 * (image * text).sum(-1).clamp(min=0)


class CLIPScorer:
    """images in [-1, 1] + captions -> (B,) CLIP scores, with a local `CLIPModel` and its tokenizer."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu"):
        from transformers import AutoTokenizer, CLIPModel

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"clip_model={path}: not a local Hugging Face CLIP folder (no config.json); "
                                    "CLIP score reads a local path only")
        self.model = CLIPModel.from_pretrained(str(path)).eval().to(device)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.device = torch.device(device)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] -> CLIP's input: bicubic resize to the vision tower's size, then mean/std normalisation
        (square images, so CLIPImageProcessor's shorter-side resize + centre crop is this resize)."""
        size = self.model.config.vision_config.image_size
        x = F.interpolate((images.float() + 1) / 2, size=(size, size), mode="bicubic", align_corners=False,
                          antialias=True).clamp(0, 1)
        mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        return ((x - mean.to(x)) / std.to(x)).to(self.device)

    def __call__(self, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        if len(images) != len(captions):
            raise ValueError(f"CLIPScorer: {len(images)} images but {len(captions)} captions")
        max_length = self.model.config.text_config.max_position_embeddings
        tokens = self.tokenizer(list(captions), padding="max_length", truncation=True, max_length=max_length,
                                return_tensors="pt").to(self.device)
        return clip_score(self.model, self.preprocess(images), tokens["input_ids"], tokens["attention_mask"]).cpu()
