"""CLIP judge: raw cosine similarity of image and text embeddings (T2I-CompBench non-spatial, CLIPScore without
the x100 and clipping), and zero-shot classification (the prompt attack's classifier)."""

from __future__ import annotations

import json
import os
from typing import Sequence

import PIL.Image
import torch

from comat.core.errors import ComatError
from comat.judges.base import Judge
from comat.models.hub import resolve_model_path


def unit_features(features) -> torch.Tensor:
    # transformers 5 returns the projected features as an output's pooler_output, 4.x as a tensor.
    features = features if isinstance(features, torch.Tensor) else features.pooler_output
    return torch.nn.functional.normalize(features, dim=-1)


class ClipJudge(torch.nn.Module, Judge):
    def __init__(self, model, processor):
        super().__init__()
        self.model = model.requires_grad_(False).eval()
        self.processor = processor

    @classmethod
    def load(cls, ref: str | os.PathLike, *, device: str | torch.device = "cpu") -> "ClipJudge":
        from transformers import CLIPModel, CLIPProcessor

        path = resolve_model_path(ref)
        config = path / "config.json"
        arch = json.loads(config.read_text()).get("architectures") if config.is_file() else None
        if not arch or "CLIPModel" not in arch:
            raise ComatError(f"CLIP judge '{ref}' is not a CLIPModel ({arch}); pass one such as openai/clip-vit-base-patch32")
        model = CLIPModel.from_pretrained(str(path), use_safetensors=True, dtype=torch.float32).to(device)
        return cls(model, CLIPProcessor.from_pretrained(str(path)))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def image_embeds(self, images: Sequence[PIL.Image.Image]) -> torch.Tensor:
        pixels = self.processor(images=list(images), return_tensors="pt").pixel_values.to(self.device)
        return unit_features(self.model.get_image_features(pixel_values=pixels))

    @torch.no_grad()
    def text_embeds(self, texts: Sequence[str]) -> torch.Tensor:
        enc = self.processor(text=list(texts), return_tensors="pt", padding=True, truncation=True).to(self.device)
        return unit_features(self.model.get_text_features(**enc))

    def similarity(self, images: Sequence[PIL.Image.Image], texts: Sequence[str]) -> list[float]:
        """Cosine of each image with its text."""
        if len(images) != len(texts):
            raise ComatError(f"CLIP judge got {len(images)} images but {len(texts)} texts; pass one text per image")
        return (self.image_embeds(images) * self.text_embeds(texts)).sum(-1).cpu().tolist()
