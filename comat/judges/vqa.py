"""BLIP-VQA judge: yes-probabilities (T2I-CompBench) and short free-form answers (TIFA / DPG-Bench stand-in).

Protocol (T2I-CompBench BLIP-VQA): the question goes through BLIP's text encoder with its
first token set to ``[ENC]`` (the original BLIP code does this; HF's processor leaves ``[CLS]``), the
answer decoder starts from ``[DEC]``, and ``p = P(yes) / (P(yes) + P(no))`` at the first decoding step.

The image size is the processor's, except for hub checkpoints known to have been fine-tuned at another
resolution than their processor config says (BLIP's VQA models: 480 px, ``vqa.yaml``); position
embeddings are interpolated whenever the size differs from the vision config's.

The forward pass is written out here (vision -> question encoder -> answer decoder) instead of going
through ``BlipForQuestionAnswering.forward``/``generate``: ``forward`` returns no logits and ``generate``
lets the decoder attend to question padding; training (comat.toy.recipes_text) uses the same functions.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from comat.core.errors import ComatError
from comat.judges.base import Judge
from comat.models.hub import resolve_model_path

# BLIP's VQA checkpoints were fine-tuned at 480 px; their HF processor configs say 384.
FINETUNED_IMAGE_SIZE = {"Salesforce/blip-vqa-capfilt-large": 480, "Salesforce/blip-vqa-base": 480}


def encode_questions(tokenizer, questions: Sequence[str]) -> tuple[Tensor, Tensor]:
    """``input_ids`` (first token ``[ENC]`` where the vocabulary has it) and ``attention_mask``, right padded."""
    enc = tokenizer(list(questions), padding="longest", return_tensors="pt")
    input_ids = enc.input_ids.clone()
    enc_id = tokenizer.convert_tokens_to_ids("[ENC]")
    if enc_id is not None and enc_id != tokenizer.unk_token_id:
        input_ids[:, 0] = enc_id
    return input_ids, enc.attention_mask


def question_states(model, image_embeds: Tensor, input_ids: Tensor, attention_mask: Tensor,
                    return_attention: bool = False):
    """The question encoder's output, cross-attending to the image; with ``return_attention`` also its last
    layer's cross-attention (head mean, ``[B, T, image tokens]``)."""
    image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
    out = model.text_encoder(
        input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
        encoder_attention_mask=image_mask, output_attentions=return_attention,
    )
    if return_attention:
        return out.last_hidden_state, out.cross_attentions[-1].mean(1)
    return out.last_hidden_state


def answer_logits(model, states: Tensor, attention_mask: Tensor, decoder_input_ids: Tensor,
                  decoder_attention_mask: Tensor | None = None) -> Tensor:
    """Decoder logits ``[B, T, V]``; ``logits[:, t]`` predicts answer token ``t + 1``."""
    return model.text_decoder(
        input_ids=decoder_input_ids, attention_mask=decoder_attention_mask, encoder_hidden_states=states,
        encoder_attention_mask=attention_mask,
    ).logits


class VqaJudge(torch.nn.Module, Judge):
    """A frozen ``BlipForQuestionAnswering`` with its processor. Build one with :meth:`load`."""

    def __init__(self, model, processor, *, image_size: int):
        super().__init__()
        self.model = model.requires_grad_(False).eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        self.image_size = int(image_size)
        self.interpolate = self.image_size != int(model.config.vision_config.image_size)
        self.yes_id, self.no_id = (self._single_token(w) for w in ("yes", "no"))
        mean, std = self.image_processor.image_mean, self.image_processor.image_std
        self.register_buffer("image_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def load(cls, ref: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
             image_size: int | None = None) -> "VqaJudge":
        """Load from a hub id, a directory or ``toy/vqa`` (safetensors only)."""
        from transformers import BlipForQuestionAnswering, BlipProcessor

        path = resolve_model_path(ref)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ComatError(f"VQA judge '{ref}' has no config.json in {path}; save it there with save_pretrained")
        arch = json.loads(config_file.read_text()).get("architectures") or []
        if "BlipForQuestionAnswering" not in arch:
            raise ComatError(f"VQA judge '{ref}' is a {arch or 'model of unknown architecture'}, not "
                             "BlipForQuestionAnswering; pass a BLIP-VQA checkpoint such as Salesforce/blip-vqa-capfilt-large")
        try:
            processor = BlipProcessor.from_pretrained(str(path))
        except (OSError, ValueError) as e:
            raise ComatError(f"could not load the processor of VQA judge '{path}' ({type(e).__name__}: {e}); "
                             "save it there with processor.save_pretrained") from None
        model = BlipForQuestionAnswering.from_pretrained(str(path), use_safetensors=True, dtype=dtype).to(device)
        if image_size is None:
            image_size = FINETUNED_IMAGE_SIZE.get(str(ref)) or processor.image_processor.size["height"]
        return cls(model, processor, image_size=image_size).to(device)

    def train(self, mode: bool = True) -> "VqaJudge":
        super().train(mode)
        self.model.eval()  # a judge never drops out
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _single_token(self, word: str) -> int:
        ids = self.tokenizer(word, add_special_tokens=False).input_ids
        if len(ids) != 1 or ids[0] == self.tokenizer.unk_token_id:
            raise ComatError(f"the VQA judge's vocabulary has no single token for {word!r}; it cannot answer yes/no")
        return ids[0]

    # -- inputs ------------------------------------------------------------------------------------

    def preprocess(self, images: Tensor | Sequence) -> Tensor:
        """``pixel_values`` at ``image_size``: float tensors ``[B,3,H,W]`` in ``[0,1]`` are resized in torch
        (bicubic, antialiased), PIL images by the processor (PIL bicubic, as the original transforms)."""
        if isinstance(images, Tensor):
            if images.ndim != 4 or images.shape[1] != 3:
                raise ComatError(f"VQA images must be [B,3,H,W] floats in [0,1], got shape {tuple(images.shape)}")
            x = images.float()
            if x.shape[-2:] != (self.image_size, self.image_size):
                x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False,
                                  antialias=True)
            x = (x - self.image_mean.to(x.device)) / self.image_std.to(x.device)
        else:
            size = {"height": self.image_size, "width": self.image_size}
            x = self.image_processor([im.convert("RGB") for im in images], size=size, return_tensors="pt").pixel_values
        return x.to(device=self.device, dtype=self.dtype)

    def _encode(self, images, questions: Sequence[str]) -> tuple[Tensor, Tensor]:
        if isinstance(questions, str):
            questions = [questions]
        if len(questions) != len(images):
            raise ComatError(f"VQA judge got {len(images)} images but {len(questions)} questions; pass one question per image")
        pixel_values = self.preprocess(images)
        image_embeds = self.model.vision_model(pixel_values, interpolate_pos_encoding=self.interpolate).last_hidden_state
        input_ids, attention_mask = (t.to(self.device) for t in encode_questions(self.tokenizer, questions))
        return question_states(self.model, image_embeds, input_ids, attention_mask), attention_mask

    def _start(self, n: int) -> Tensor:
        return torch.full((n, 1), self.model.config.text_config.bos_token_id, dtype=torch.long, device=self.device)

    # -- answers -----------------------------------------------------------------------------------

    @torch.no_grad()
    def first_step_logits(self, images: Tensor | Sequence, questions: Sequence[str]) -> Tensor:
        """Logits of the first answer token, ``[B, V]`` (float32)."""
        states, mask = self._encode(images, questions)
        return answer_logits(self.model, states, mask, self._start(len(states)))[:, 0].float()

    @torch.no_grad()
    def yes_probability(self, images: Tensor | Sequence, questions: Sequence[str], *, batch_size: int = 64) -> Tensor:
        """``P(yes) / (P(yes) + P(no))`` at the first decoding step, ``[B]`` float32 on the CPU."""
        out = []
        for i in range(0, len(images), batch_size):
            logits = self.first_step_logits(images[i : i + batch_size], list(questions[i : i + batch_size]))
            out.append(torch.sigmoid(logits[:, self.yes_id] - logits[:, self.no_id]).cpu())
        return torch.cat(out) if out else torch.zeros(0)

    @torch.no_grad()
    def answer(self, images: Tensor | Sequence, questions: Sequence[str], max_new_tokens: int = 5, *,
               batch_size: int = 64) -> list[str]:
        """Greedy free-form answers (lower case, special tokens dropped)."""
        answers: list[str] = []
        sep = self.model.config.text_config.sep_token_id
        pad = self.model.config.text_config.pad_token_id
        for i in range(0, len(images), batch_size):
            states, mask = self._encode(images[i : i + batch_size], list(questions[i : i + batch_size]))
            ids = self._start(len(states))
            done = torch.zeros(len(states), dtype=torch.bool, device=self.device)
            for _ in range(max_new_tokens):
                nxt = answer_logits(self.model, states, mask, ids)[:, -1].argmax(-1)
                nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
                ids = torch.cat([ids, nxt[:, None]], 1)
                done |= nxt == sep
                if bool(done.all()):
                    break
            answers += [self.tokenizer.decode(row[1:], skip_special_tokens=True).strip() for row in ids.tolist()]
        return answers


def to_tensor_images(images: np.ndarray) -> Tensor:
    """uint8 ``[B,H,W,3]`` -> float ``[B,3,H,W]`` in ``[0,1]``."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255)
