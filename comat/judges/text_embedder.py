"""Sentence embeddings, and TIFA's multiple-choice mapping: a free-form answer becomes the choice nearest to it.

Real world (TIFA's protocol): ``sentence-transformers/all-mpnet-base-v2`` loaded with transformers' ``AutoModel``
and pooled as TIFA's ``SBERTModel`` (and sentence-transformers itself) do: the mean of the last hidden states
over the attention mask, then L2 normalisation. The sentence-transformers package is not needed for this, so it
is not a dependency.

Toy world: the toy CLIP (``toy/clip``) stands in. Its text tower was trained contrastively, so its sentence
vector is the projected end-of-text state (``get_text_features``), not a mean over tokens: that is the vector
CLIP's training made meaningful, the way mean pooling is for SBERT. Both kinds answer through the same
``embed`` / ``nearest`` interface, chosen by the checkpoint's architecture.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import torch
import torch.nn.functional as F

from comat.core.errors import ComatError
from comat.judges.base import Judge
from comat.judges.clip import unit_features
from comat.models.hub import resolve_model_path


class TextEmbedder(Judge):
    """Unit-length sentence embeddings from a frozen text encoder. Build one with :meth:`load`."""

    def __init__(self, model, tokenizer, *, pooling: str, batch_size: int = 64):
        if pooling not in ("mean", "clip"):
            raise ValueError(f"unknown pooling {pooling!r}")
        self.model = model.requires_grad_(False).eval()
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.batch_size = batch_size

    @classmethod
    def load(cls, ref: str | os.PathLike, *, device: str | torch.device = "cpu") -> "TextEmbedder":
        """A sentence encoder (any ``AutoModel`` text encoder: mean pooling) or a ``CLIPModel`` (its text features)."""
        from transformers import AutoModel, AutoTokenizer, CLIPModel

        path = resolve_model_path(ref)
        config = path / "config.json"
        if not config.is_file():
            raise ComatError(f"text embedder '{ref}' has no config.json in {path}; pass a sentence encoder such as "
                             "sentence-transformers/all-mpnet-base-v2 saved with save_pretrained")
        arch = json.loads(config.read_text()).get("architectures") or []
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError) as e:
            raise ComatError(f"could not load the tokenizer of text embedder '{path}' ({type(e).__name__}: {e}); "
                             "save it there with tokenizer.save_pretrained") from None
        pooling, loader = ("clip", CLIPModel) if "CLIPModel" in arch else ("mean", AutoModel)
        try:
            model = loader.from_pretrained(str(path), use_safetensors=True, dtype=torch.float32)
        except OSError as e:  # typically no safetensors weights: this project never unpickles .bin files
            raise ComatError(f"could not load text embedder '{ref}' from {path} ({e}); it needs safetensors weights "
                             "(convert them with save_pretrained(safe_serialization=True))") from None
        return cls(model.to(device), tokenizer, pooling=pooling)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """``[N, D]`` float32 on the CPU, each row of unit length."""
        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(list(texts[i : i + self.batch_size]), padding=True, truncation=True,
                                 return_tensors="pt").to(self.device)
            if self.pooling == "clip":
                out.append(unit_features(self.model.get_text_features(input_ids=enc.input_ids,
                                                              attention_mask=enc.attention_mask)).float().cpu())
                continue
            hidden = self.model(**enc)[0]
            mask = enc.attention_mask.unsqueeze(-1).to(hidden.dtype)
            vec = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(F.normalize(vec.float(), p=2, dim=1).cpu())
        return torch.cat(out) if out else torch.zeros(0, 0)

    def nearest(self, answers: Sequence[str], choices: Sequence[Sequence[str]]) -> list[str]:
        """For each answer, the choice of highest cosine (the first on a tie, as ``torch.argmax``). Every distinct
        text is embedded once."""
        if len(answers) != len(choices):
            raise ComatError(f"text embedder got {len(answers)} answers but {len(choices)} choice lists")
        texts = list(dict.fromkeys([*answers, *(c for cs in choices for c in cs)]))
        index = {t: i for i, t in enumerate(texts)}
        vectors = self.embed(texts)
        picked = []
        for answer, options in zip(answers, choices):
            if not options:
                raise ComatError(f"no choices to map the answer {answer!r} to")
            sims = vectors[[index[c] for c in options]] @ vectors[index[answer]]
            picked.append(options[int(torch.argmax(sims))])
        return picked
