"""Frozen image-to-text captioners that score ``log p(text | image)`` differentiably in the image.

CoMat's concept-activation loss is ``L_i2t = -log p_C(P | I)`` (paper eq. 2) from a frozen captioner C;
the generated image I must receive the gradient, so every step from the float image to the token
log-probabilities runs in torch: no PIL, no processor ``__call__`` on images.

Three captioner families are supported (paper Table 7):

* ``blip``  - ``BlipForConditionalGeneration`` (official: ``Salesforce/blip-image-captioning-large``),
* ``git``   - ``GitForCausalLM`` (e.g. ``microsoft/git-large-coco``),
* ``llava`` - ``LlavaForConditionalGeneration`` (e.g. ``llava-hf/llava-1.5-7b-hf``).

What the log-probability is (the project's choice, recorded here):

* The scored sequence is ``prefix + text`` (``text`` lower-cased for the BERT-vocabulary models BLIP and
  GIT, as in the official code) followed by the model's end-of-caption token (BLIP ``[SEP]``, GIT
  ``eos``, LLaVA ``eos``), because the captioner must also find the caption *complete*. The tokens of
  the prefix (and the start token, and for LLaVA the whole chat context) are conditioning, not scored.
* ``reduction="sum"`` (default) is the paper's eq. 2: the sum of the scored tokens' log-probabilities.
  ``reduction="mean"`` divides by the number of scored tokens of each sample.
* ``label_smoothing=eps`` returns the *negative label-smoothed cross-entropy* per token,
  ``(1 - eps) * log p(y) + eps * mean_v log p(v)``, exactly what ``torch.nn.functional.cross_entropy(...,
  label_smoothing=eps)`` negates. The official CoMat code minimises HF BLIP's ``outputs.loss`` with
  ``label_smoothing=0.1`` and token-mean reduction; ``reduction="mean", label_smoothing=0.1`` reproduces
  that value per sample (for a batch, HF averages over all tokens of the batch, weighting long captions
  more; this returns one value per sample). With ``eps > 0`` the value is no longer a log-likelihood.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from comat.core.errors import ComatError
from comat.models.hub import resolve_model_path

KNOWN_KINDS = ("blip", "git", "llava")
_MODEL_TYPES = {"blip": "blip", "git": "git", "llava": "llava"}
DEFAULT_PREFIX = "a photography of "
DEFAULT_LLAVA_QUESTION = "Describe the image in one sentence."
IGNORE_INDEX = -100


def _keep_kwargs(model: torch.nn.Module, keep: int) -> dict[str, int]:
    # transformers 5 (and late 4.x) take logits_to_keep; older BLIP does not, and the caller slices anyway.
    params = inspect.signature(model.forward).parameters
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in params:
            return {name: keep}
    return {}


def _common_prefix_len(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def token_log_probs(
    logits: Tensor, targets: Tensor, *, reduction: str = "sum", label_smoothing: float = 0.0
) -> Tensor:
    """Per-sample score of ``targets`` under ``logits`` (already aligned: ``logits[:, t]`` predicts ``targets[:, t]``).

    ``targets`` equal to ``-100`` are ignored. Returns ``[B]``: the sum (or per-sample mean) over scored tokens of
    ``(1 - eps) * log p(y) + eps * mean_v log p(v)`` (``eps = label_smoothing``; ``eps = 0`` is plain log p).
    """
    if reduction not in ("sum", "mean"):
        raise ComatError(f"unknown reduction '{reduction}'; use 'sum' (paper eq. 2) or 'mean' (token mean)")
    if not 0.0 <= label_smoothing < 1.0:
        raise ComatError(f"label_smoothing={label_smoothing} is out of range; use a value in [0, 1)")
    # float32 log_softmax: bf16/fp16 logits lose the small per-token differences the loss is made of.
    logp = logits.float().log_softmax(-1)
    mask = targets != IGNORE_INDEX
    tok = logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    if label_smoothing > 0:
        tok = (1.0 - label_smoothing) * tok + label_smoothing * logp.mean(-1)
    tok = torch.where(mask, tok, torch.zeros_like(tok))
    total = tok.sum(1)
    if reduction == "mean":
        total = total / mask.sum(1).clamp_min(1)
    return total


class Captioner(torch.nn.Module):
    """A frozen HF captioner plus the differentiable image preprocessing and text encoding it needs.

    Subclasses define how ``prefix + text`` becomes ``input_ids``/``labels`` and how the model is called; the
    scoring (:meth:`log_prob`) is shared. Build one with :func:`load_captioner`.
    """

    kind: str = ""
    lowercase: bool = True

    def __init__(
        self,
        model: torch.nn.Module,
        processor: Any,
        *,
        image_size: int,
        image_mean: list[float] | tuple[float, ...],
        image_std: list[float] | tuple[float, ...],
        center_crop: bool = False,
    ):
        super().__init__()
        self.model = model
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.image_size = int(image_size)
        self.center_crop = center_crop
        self.register_buffer("image_mean", torch.tensor(image_mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(image_std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.freeze()

    # -- state -------------------------------------------------------------------------------------

    def freeze(self) -> None:
        """No captioner weight trains and dropout stays off: the captioner is a fixed judge."""
        self.model.requires_grad_(False)
        self.model.eval()

    def train(self, mode: bool = True) -> "Captioner":
        # A training loop calls .train() on its whole module tree; the judge must not start dropping out.
        super().train(mode)
        self.model.eval()
        return self

    def num_parameters(self) -> int:
        """All parameters of the captioner (tied weights once); paper Table 7: BLIP 469M, GIT 394M, LLaVA 7.2B."""
        return sum(p.numel() for p in self.model.parameters())

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # -- images ------------------------------------------------------------------------------------

    def preprocess(self, images: Tensor, *, jitter: int = 0, generator: torch.Generator | None = None) -> Tensor:
        """``[B,3,H,W]`` in ``[0,1]`` -> normalised ``pixel_values`` at ``image_size``, differentiable in ``images``.

        ``jitter > 0`` first crops each image by a random 0..``jitter`` pixels in height and width at a random offset
        (the official CoMat BLIP loss uses 0-2 px), so the generator cannot overfit one exact pixel grid.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ComatError(f"captioner images must be [B,3,H,W] floats in [0,1], got shape {tuple(images.shape)}")
        images = images.float()
        if jitter > 0:
            images = torch.cat([self._random_crop(img[None], jitter, generator) for img in images])
        else:
            images = self._resize(images)
        pixel_values = (images - self.image_mean.to(images.device)) / self.image_std.to(images.device)
        return pixel_values.to(device=self.device, dtype=self.dtype)

    def _random_crop(self, image: Tensor, jitter: int, generator: torch.Generator | None) -> Tensor:
        _, _, h, w = image.shape
        jitter = min(jitter, h - 1, w - 1)
        dev = generator.device if generator is not None else "cpu"
        dh, dw = (int(v) for v in torch.randint(0, jitter + 1, (2,), generator=generator, device=dev))
        top = int(torch.randint(0, dh + 1, (1,), generator=generator, device=dev))
        left = int(torch.randint(0, dw + 1, (1,), generator=generator, device=dev))
        return self._resize(image[:, :, top : top + h - dh, left : left + w - dw])

    def _resize(self, images: Tensor) -> Tensor:
        s = self.image_size
        h, w = images.shape[-2:]
        if not self.center_crop:
            size = (s, s)
        else:
            # CLIP-style processors: shortest edge to s, then centre crop s x s (identical to (s, s) for squares).
            scale = s / min(h, w)
            size = (max(s, round(h * scale)), max(s, round(w * scale)))
        if (h, w) != size:
            # antialias=True matches PIL / torchvision bicubic downsampling (e.g. 512 -> 384) and stays differentiable.
            images = F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=True)
        if self.center_crop and size != (s, s):
            top, left = (size[0] - s) // 2, (size[1] - s) // 2
            images = images[:, :, top : top + s, left : left + s]
        return images

    # -- text --------------------------------------------------------------------------------------

    def caption(self, text: str, prefix: str) -> str:
        return prefix + (text.lower() if self.lowercase else text)

    def encode_texts(self, texts: list[str], prefix: str) -> tuple[Tensor, Tensor, Tensor]:
        """``input_ids``, ``attention_mask`` (right padded) and ``labels`` (``-100`` outside the scored caption)."""
        rows = [self._encode_one(t, prefix) for t in texts]
        length = max(len(ids) for ids, _ in rows)
        pad = self.tokenizer.pad_token_id
        pad = 0 if pad is None else pad
        input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, (ids, n_context) in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            attention_mask[i, : len(ids)] = 1
            labels[i, n_context : len(ids)] = torch.tensor(ids[n_context:], dtype=torch.long)
        return input_ids, attention_mask, labels

    def _encode_one(self, text: str, prefix: str) -> tuple[list[int], int]:
        """Token ids of one sequence and the number of leading context (unscored) tokens."""
        raise NotImplementedError

    def _tokens(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # -- model -------------------------------------------------------------------------------------

    def _forward_logits(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor, keep: int) -> Tensor:
        """Logits at the last ``keep`` text positions, ``[B, keep, V]``."""
        raise NotImplementedError

    def log_prob(
        self,
        images: Tensor,
        texts: list[str],
        *,
        prefix: str = DEFAULT_PREFIX,
        reduction: str = "sum",
        label_smoothing: float = 0.0,
        jitter: int = 0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """``log p(prefix + text | image)`` over the caption tokens, one value per sample (shape ``[B]``).

        ``images``: ``[B,3,H,W]`` floats in ``[0,1]`` (any size; gradients flow back to them). ``texts``: B prompts.
        ``reduction``: ``"sum"`` (paper eq. 2) or ``"mean"`` over scored tokens. ``label_smoothing`` > 0 gives the
        negative label-smoothed cross-entropy instead (see the module docstring). ``jitter``: random crop of up to
        that many pixels before resizing, drawn from ``generator``.
        """
        if isinstance(texts, str):
            texts = [texts]
        if len(texts) != images.shape[0]:
            raise ComatError(f"captioner got {images.shape[0]} images but {len(texts)} texts; pass one text per image")
        pixel_values = self.preprocess(images, jitter=jitter, generator=generator)
        input_ids, attention_mask, labels = self.encode_texts(list(texts), prefix)
        input_ids, attention_mask, labels = (t.to(self.device) for t in (input_ids, attention_mask, labels))
        scored = (labels != IGNORE_INDEX).any(0).nonzero()
        if scored.numel() == 0:
            return images.new_zeros(images.shape[0]) + 0.0 * images.sum()
        # Only positions first-scored-1 .. end predict scored tokens; skipping the rest spares LLaVA's long
        # image+chat context a vocabulary-sized projection.
        first = int(scored[0])
        keep = input_ids.shape[1] - first + 1
        logits = self._forward_logits(pixel_values, input_ids, attention_mask, keep)
        targets = labels[:, input_ids.shape[1] - keep + 1 :]
        return token_log_probs(logits[:, :-1], targets, reduction=reduction, label_smoothing=label_smoothing)

    def forward(self, images: Tensor, texts: list[str], **kwargs: Any) -> Tensor:
        return self.log_prob(images, texts, **kwargs)


class BlipCaptioner(Captioner):
    """BLIP: ``[DEC] prefix text [SEP]``; the image enters the text decoder through cross-attention."""

    kind = "blip"

    def _encode_one(self, text: str, prefix: str) -> tuple[list[int], int]:
        cfg = self.model.config.text_config
        # transformers 5 no longer swaps the tokenizer's [CLS] for BLIP's decoder start token: put it first here.
        bos = cfg.bos_token_id
        eos = cfg.sep_token_id if cfg.sep_token_id is not None else self.tokenizer.sep_token_id
        body = self._tokens(self.caption(text, prefix))
        n_prefix = _common_prefix_len(self._tokens(prefix), body) if prefix else 0
        return [bos, *body, eos], 1 + n_prefix

    def _forward_logits(self, pixel_values, input_ids, attention_mask, keep):
        out = self.model(
            pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, **_keep_kwargs(self.model, keep)
        )
        return out.logits[:, -keep:]


class GitCaptioner(Captioner):
    """GIT: image tokens then ``[bos] prefix text [eos]`` in one causal sequence."""

    kind = "git"

    def _encode_one(self, text: str, prefix: str) -> tuple[list[int], int]:
        cfg = self.model.config
        bos = cfg.bos_token_id if cfg.bos_token_id is not None else self.tokenizer.cls_token_id
        eos = cfg.eos_token_id if cfg.eos_token_id is not None else self.tokenizer.sep_token_id
        body = self._tokens(self.caption(text, prefix))
        n_prefix = _common_prefix_len(self._tokens(prefix), body) if prefix else 0
        return [bos, *body, eos], 1 + n_prefix

    def _forward_logits(self, pixel_values, input_ids, attention_mask, keep):
        out = self.model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask)
        # GIT's logits start with n_img = (image_size/patch)^2 + 1 image positions; the text follows them.
        n_img = out.logits.shape[1] - input_ids.shape[1]
        return out.logits[:, n_img:][:, -keep:]


class LlavaCaptioner(Captioner):
    """LLaVA: chat template ``user: <image> question / assistant: prefix text</s>``; only the answer is scored.

    The question is :attr:`question` (default ``DEFAULT_LLAVA_QUESTION``); set it on the instance to change it.
    The caption keeps its case (a chat model is not an uncased captioner).
    """

    kind = "llava"
    lowercase = False
    question = DEFAULT_LLAVA_QUESTION

    def _context(self) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.question}]}]
        owner = self.processor if getattr(self.processor, "chat_template", None) else self.tokenizer
        if not getattr(owner, "chat_template", None):
            raise ComatError(
                "the LLaVA processor/tokenizer has no chat template; save one with the processor (chat_template=...)"
            )
        return owner.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def num_image_tokens(self) -> int:
        cfg = self.model.config
        patch = getattr(self.processor, "patch_size", None) or cfg.vision_config.patch_size
        extra = getattr(self.processor, "num_additional_image_tokens", None)
        if extra is None or getattr(self.processor, "patch_size", None) is None:
            extra = 1  # CLIP towers emit a CLS token
        n = (self.image_size // patch) ** 2 + extra
        if cfg.vision_feature_select_strategy == "default":
            n -= 1
        return n

    def _encode_one(self, text: str, prefix: str) -> tuple[list[int], int]:
        context = self._context()
        if context and not context[-1].isspace():
            context += " "
        full = list(self.tokenizer(context + self.caption(text, prefix))["input_ids"])
        # Shared leading tokens are conditioning; a merge across the boundary is counted as caption.
        n_context = _common_prefix_len(list(self.tokenizer(context + prefix)["input_ids"]), full)
        eos = self.tokenizer.eos_token_id
        if eos is not None and full[-1] != eos:
            full.append(eos)
        # The template holds one <image>; the model wants one placeholder per image feature.
        image_id = self.model.config.image_token_id
        n_img = self.num_image_tokens()
        ids: list[int] = []
        for i, tok in enumerate(full):
            ids.extend([tok] * n_img if tok == image_id else [tok])
            if tok == image_id and i < n_context:
                n_context += n_img - 1
        return ids, n_context

    def _forward_logits(self, pixel_values, input_ids, attention_mask, keep):
        out = self.model(
            pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, **_keep_kwargs(self.model, keep)
        )
        return out.logits[:, -keep:]


_CLASSES = {"blip": BlipCaptioner, "git": GitCaptioner, "llava": LlavaCaptioner}


def _model_class(kind: str):
    import transformers

    name = {"blip": "BlipForConditionalGeneration", "git": "GitForCausalLM", "llava": "LlavaForConditionalGeneration"}[kind]
    return getattr(transformers, name)


def _check_files(path: Path) -> None:
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any((path / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json")):
        missing.append("model.safetensors")
    if not any((path / f).is_file() for f in ("preprocessor_config.json", "processor_config.json")):
        missing.append("preprocessor_config.json/processor_config.json")
    if not any((path / f).is_file() for f in ("tokenizer.json", "vocab.txt", "tokenizer.model", "vocab.json")):
        missing.append("tokenizer files (tokenizer.json or vocab.txt)")
    if missing:
        raise ComatError(
            f"captioner directory '{path}' lacks {', '.join(missing)}; save the model and its processor there with "
            "save_pretrained (safetensors) or pass a hub id"
        )


def load_captioner(
    kind: str,
    ref: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
) -> Captioner:
    """Load a frozen captioner of ``kind`` (``blip``, ``git``, ``llava``) from a hub id or local directory.

    The model and its processor are read with ``from_pretrained`` (safetensors only); the image size comes from the
    vision config and the normalisation from the saved image processor config. Weights are frozen, eval mode.
    """
    kind = str(kind).lower()
    if kind not in _CLASSES:
        raise ComatError(f"unknown captioner kind '{kind}'; use one of {', '.join(KNOWN_KINDS)}")
    path = resolve_model_path(ref)
    _check_files(path)
    import json

    from transformers import AutoProcessor

    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type != _MODEL_TYPES[kind]:
        hint = next((k for k, v in _MODEL_TYPES.items() if v == model_type), None)
        fix = f"pass kind='{hint}'" if hint else f"pass a {kind} checkpoint"
        raise ComatError(f"captioner '{ref}' is a '{model_type}' model, not {kind}; {fix}")
    extra = {"trust_remote_code": True} if trust_remote_code else {}
    try:
        processor = AutoProcessor.from_pretrained(str(path), **extra)
    except (OSError, ValueError) as e:
        raise ComatError(f"could not load the processor of captioner '{path}' ({type(e).__name__}: {e}); "
                         "save it there with processor.save_pretrained") from None
    import transformers
    from packaging.version import Version

    # transformers renamed torch_dtype to dtype in 4.56 and warns on the old name.
    dtype_kw = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    model = _model_class(kind).from_pretrained(str(path), use_safetensors=True, **{dtype_kw: dtype}, **extra)
    model.to(device)
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None or getattr(image_processor, "image_mean", None) is None:
        raise ComatError(f"captioner '{path}' has no image processor with image_mean/image_std; save its processor there")
    center_crop = bool(getattr(image_processor, "do_center_crop", False))
    captioner = _CLASSES[kind](
        model,
        processor,
        image_size=model.config.vision_config.image_size,
        image_mean=list(image_processor.image_mean),
        image_std=list(image_processor.image_std),
        center_crop=center_crop,
    )
    return captioner.to(device)
