"""Gumbel-softmax prompt attack (Du et al., "Stable Diffusion is Unstable", NeurIPS 2023).

``n`` token positions appended after a prompt ("a photo of a tench and a" + n tokens) hold learnable logits over a
candidate vocabulary. Each iteration draws a Gumbel-softmax relaxation of them, mixes the text encoder's token
embeddings with it, samples an image with the frozen pipeline, decodes it with the VAE and classifies it zero-shot
with CLIP; a margin (Carlini-Wagner) loss pushes the true class below the best other class and Adam updates the
logits. The attack's prompt is the argmax token of each position, decoded to text.

As upstream (``whitebox_attack.py`` at duchengbin8/Stable_Diffusion_is_Unstable@5a5d85c):

- the relaxation is the soft Gumbel-softmax (``F.gumbel_softmax(..., hard=False)``, tau 1); ``straight_through``
  switches to the hard one-hot forward with soft gradients;
- only the last denoising step and the VAE decode build a graph (their modified pipeline runs every earlier step
  under ``no_grad``), so the gradient reaches the text through the last UNet call's cross-attention;
- the margin loss is ``max(z_y - max_{c != y} z_c + kappa, 0)`` on CLIP logits (``logit_scale * cos``, 100 for the
  OpenAI checkpoints, where upstream hard-codes 100), kappa 30;
- the sampling noise is one stream per sample (upstream reuses one seeded generator for every pipeline call), so
  each iteration sees fresh noise; here iteration 0 starts from the same noise as the sample's clean image.

The pipeline is reused as is: hooks make its own ``encode_prompt`` read the attack's token ids and splice the
mixed embeddings into the token-embedding output, so the SD and SDXL text paths (penultimate layer, pooled EOS,
two encoders) are the pipeline's. Upstream had to patch transformers' CLIP to accept ``inputs_embeds``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Iterator, Sequence

import PIL.Image
import torch
import torch.nn.functional as F
from torch import Tensor

from comat.core.errors import ComatError
from comat.generation.sampling import decode, encode, initial_latents, make_scheduler, null_embeds, sample_with_grad
from comat.judges.clip import unit_features

__all__ = [
    "AttackResult",
    "AttackSettings",
    "PromptAttacker",
    "ZeroShotClassifier",
    "attack_succeeded",
    "class_in_text",
    "class_margin",
    "gumbel_softmax",
    "margin_loss",
    "vocabulary",
]


@dataclasses.dataclass(frozen=True)
class AttackSettings:
    tokens: int = 5  # appended positions
    iterations: int = 100
    lr: float = 0.3
    tau: float = 1.0
    straight_through: bool = False  # False: soft Gumbel-softmax, as upstream
    kappa: float = 30.0
    steps: int = 50
    guidance: float = 7.5
    scheduler: str = "ddim"
    resolution: int | None = None  # None: the pipeline's native size

    def __post_init__(self) -> None:
        if self.tokens < 1 or self.iterations < 1 or self.steps < 1:
            raise ComatError(f"attack needs tokens, iterations and steps of at least 1, got {self.tokens}, "
                             f"{self.iterations}, {self.steps}")


@dataclasses.dataclass
class AttackResult:
    prompt: str  # the prompt the tokens were appended to (decoded when it had to be cut to make room)
    token_ids: list[int]
    attack_text: str  # the appended tokens, decoded
    final_prompt: str
    truncated: bool  # the prompt was cut to leave room for the tokens
    roundtrip: bool  # re-tokenising attack_text gives token_ids back (upstream reports the token error rate)
    losses: list[float]  # margin loss per iteration


# ------------------------------------------------------------------------------------------------ loss


def class_margin(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-sample ``z_y - max_{c != y} z_c``: negative when the top-1 class is not ``y``."""
    true = logits.gather(1, labels[:, None])[:, 0]
    return true - logits.scatter(1, labels[:, None], float("-inf")).amax(1)


def margin_loss(logits: Tensor, labels: Tensor, kappa: float) -> Tensor:
    """Per-sample ``max(z_y - max_{c != y} z_c + kappa, 0)``: zero once the true class trails by ``kappa``."""
    return (class_margin(logits, labels) + kappa).clamp(min=0)


def gumbel_softmax(logits: Tensor, tau: float = 1.0, *, hard: bool = False,
                   generators: Sequence[torch.Generator] | None = None) -> Tensor:
    """Gumbel-softmax over the last dimension, ``[B, ...]``; ``hard``: one-hot forward, soft gradient.

    Written out because ``F.gumbel_softmax`` draws from the global RNG; one generator per sample (row) keeps each
    sample's attack reproducible from its seed whatever else shares the batch or the process.
    """
    if generators is None:
        exp = torch.empty_like(logits).exponential_()
    else:
        if len(generators) != logits.shape[0]:
            raise ComatError(f"{len(generators)} generators for a batch of {logits.shape[0]}; pass one per sample")
        exp = torch.stack([torch.empty(logits.shape[1:]).exponential_(generator=g) for g in generators]).to(logits)
    soft = ((logits - exp.log()) / tau).softmax(-1)
    if not hard:
        return soft
    one_hot = torch.zeros_like(soft).scatter_(-1, soft.argmax(-1, keepdim=True), 1.0)
    return one_hot - soft.detach() + soft


def class_in_text(classname: str, text: str) -> bool:
    """Case-insensitive: the CLIP tokenizer lower-cases what it decodes, so upstream's case-sensitive test could
    never pass for capitalised class names ("American robin")."""
    return classname.lower() in text.lower()


def attack_succeeded(classname: str, final_prompt: str, predicted: int, label: int) -> bool:
    """The class name is still in the prompt and the classifier's top-1 on the final image is another class."""
    return class_in_text(classname, final_prompt) and predicted != label


def vocabulary(tokenizer, words: Sequence[str] | None = None) -> Tensor:
    """Candidate token ids: every non-special token of ``tokenizer``, or every token of ``words``."""
    if words is None:
        special = set(tokenizer.all_special_ids)
        return torch.tensor([i for i in range(len(tokenizer)) if i not in special])
    ids = {i for w in words for i in tokenizer(w, add_special_tokens=False).input_ids}
    return torch.tensor(sorted(ids))


# ------------------------------------------------------------------------------------------ classifier


class ZeroShotClassifier(torch.nn.Module):
    """CLIP zero-shot classification: a class's weight is the normalised mean of its normalised prompt embeddings
    (CLIP's prompt ensembling, as upstream ``zeroshot_classifier``); logits are ``logit_scale * cos``.

    ``forward`` is differentiable from ``[0, 1]`` image tensors (the processor's resize, centre crop and
    normalisation in torch); :meth:`classify` takes PIL images through the judge's own processor.
    """

    def __init__(self, judge, class_texts: Sequence[Sequence[str]], *, chunk: int = 1024):
        super().__init__()
        self.judge = judge
        texts = [t for group in class_texts for t in group]
        if not texts or any(not group for group in class_texts):
            raise ComatError("zero-shot classifier needs at least one text per class")
        embeds = torch.cat([judge.text_embeds(texts[i : i + chunk]) for i in range(0, len(texts), chunk)])
        groups = torch.tensor([len(g) for g in class_texts], device=embeds.device)
        owner = torch.repeat_interleave(torch.arange(len(class_texts), device=embeds.device), groups)
        mean = torch.zeros(len(class_texts), embeds.shape[1], device=embeds.device).index_add_(0, owner, embeds)
        self.register_buffer("weights", F.normalize(mean / groups[:, None], dim=-1))
        self.scale = float(judge.model.logit_scale.exp())
        proc = judge.processor.image_processor
        self.short_edge = proc.size["shortest_edge"]
        self.crop = (proc.crop_size["height"], proc.crop_size["width"])
        self.register_buffer("mean", torch.tensor(proc.image_mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(proc.image_std).view(1, 3, 1, 1))
        self.to(judge.device)

    def __len__(self) -> int:
        return self.weights.shape[0]

    def pixels(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` in [0, 1] -> CLIP input: bicubic resize of the short edge, centre crop, normalise."""
        h, w = images.shape[-2:]
        scale = self.short_edge / min(h, w)
        x = F.interpolate(images, size=(round(h * scale), round(w * scale)), mode="bicubic", antialias=True,
                          align_corners=False)
        top, left = (x.shape[-2] - self.crop[0]) // 2, (x.shape[-1] - self.crop[1]) // 2
        x = x[..., top : top + self.crop[0], left : left + self.crop[1]]
        return (x - self.mean) / self.std

    def logits_of(self, unit_embeds: Tensor) -> Tensor:
        return self.scale * unit_embeds @ self.weights.T

    def forward(self, images: Tensor) -> Tensor:
        return self.logits_of(unit_features(self.judge.model.get_image_features(pixel_values=self.pixels(images))))

    @torch.no_grad()
    def classify(self, images: Sequence[PIL.Image.Image]) -> Tensor:
        return self.logits_of(self.judge.image_embeds(images))


# -------------------------------------------------------------------------------------------- attack


def _swap_input_ids(module, args, kwargs, *, ids: Tensor):
    """Forward pre-hook: the encoder reads the attack's ids instead of the pipeline's tokenisation of the prompt."""
    given = args[0] if args else kwargs["input_ids"]
    if given.shape != ids.shape:
        raise RuntimeError(f"text encoder got input ids of shape {tuple(given.shape)}, "
                           f"the attack prepared {tuple(ids.shape)}")
    ids = ids.to(given.device)
    return ((ids, *args[1:]), kwargs) if args else (args, {**kwargs, "input_ids": ids})


def _splice(module, inputs, output: Tensor, *, rows: Tensor, cols: Tensor, values: Tensor) -> Tensor:
    """Forward hook on the token embedding: the attack positions get the mixed embeddings (out of place, so the
    gradient reaches ``values``)."""
    return output.index_put((rows.to(output.device), cols.to(output.device)), values.to(output))


class PromptAttacker:
    """Runs the attack on a batch of prompts against one pipeline and one zero-shot classifier.

    ``candidates``: token ids the appended positions may take (:func:`vocabulary`). Every module of the pipeline is
    frozen (``requires_grad_(False)``): the attack logits are the only tensor that gets a gradient.
    """

    def __init__(self, pipe, classifier: ZeroShotClassifier, settings: AttackSettings, candidates: Tensor):
        self.pipe, self.classifier, self.settings = pipe, classifier, settings
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                module.requires_grad_(False)
        pairs = [(getattr(pipe, "tokenizer", None), getattr(pipe, "text_encoder", None)),
                 (getattr(pipe, "tokenizer_2", None), getattr(pipe, "text_encoder_2", None))]
        self.encoders = [(tok, enc) for tok, enc in pairs if tok is not None and enc is not None]
        self.device = pipe._execution_device
        self.candidates = candidates.to(self.device)
        if self.candidates.numel() == 0:
            raise ComatError("the attack's candidate vocabulary is empty")
        self.tables = [enc.get_input_embeddings().weight.detach()[self.candidates] for _, enc in self.encoders]
        self.scheduler = make_scheduler(pipe, settings.scheduler)
        self.null = null_embeds(pipe)
        self.size = settings.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor

    @property
    def tokenizer(self):
        return self.encoders[0][0]

    def layout(self, prompt: str) -> tuple[list[int], bool]:
        """The prompt's token ids (no specials) that fit before the attack tokens, and whether it had to be cut."""
        tok, n = self.tokenizer, self.settings.tokens
        room = tok.model_max_length - 2 - n
        if room < 1:
            raise ComatError(f"{n} attack tokens leave no room for a prompt in {tok.model_max_length} tokens; "
                             f"use fewer tokens")
        body = tok(prompt, add_special_tokens=False).input_ids
        return body[:room], len(body) > room

    def _ids(self, tok, bodies: list[list[int]], attack: Tensor) -> Tensor:
        rows = []
        for body, extra in zip(bodies, attack.tolist()):
            ids = [tok.bos_token_id, *body, *extra, tok.eos_token_id]
            rows.append(ids + [tok.pad_token_id] * (tok.model_max_length - len(ids)))
        return torch.tensor(rows)

    @contextlib.contextmanager
    def soft_tokens(self, bodies: list[list[int]], weights: Tensor) -> Iterator[None]:
        """While active, every text encoder of the pipeline reads ``[BOS] body <n tokens> [EOS] [PAD]...`` with the
        ``n`` positions' embeddings ``weights @ table`` (``weights``: ``[B, n, V]`` over the candidates)."""
        n = self.settings.tokens
        rows = torch.arange(len(bodies)).repeat_interleave(n)
        cols = torch.tensor([1 + len(body) + k for body in bodies for k in range(n)])
        placeholder = self.candidates[weights.argmax(-1)].cpu()  # ids at the attack positions: never read as such
        handles = []
        try:
            for (tok, enc), table in zip(self.encoders, self.tables):
                values = (weights @ table).reshape(-1, table.shape[1])
                handles.append(enc.register_forward_pre_hook(
                    functools.partial(_swap_input_ids, ids=self._ids(tok, bodies, placeholder)), with_kwargs=True))
                handles.append(enc.get_input_embeddings().register_forward_hook(
                    functools.partial(_splice, rows=rows, cols=cols, values=values)))
            yield
        finally:
            for h in handles:
                h.remove()

    def loss(self, bodies: list[list[int]], weights: Tensor, labels: Tensor, latents: Tensor,
             generators: Sequence[torch.Generator]) -> tuple[Tensor, Tensor]:
        """Per-sample margin loss and class logits of one differentiable sample from ``latents``."""
        s = self.settings
        with self.soft_tokens(bodies, weights):  # the hooks supply the ids: the text handed over is never read
            embeds = encode(self.pipe, [""] * len(bodies), self.null, height=self.size, width=self.size, grad=True)
        z = sample_with_grad(self.pipe.unet, self.scheduler, embeds, latents, steps=s.steps, guidance=s.guidance,
                             grad_steps=[s.steps - 1], generator=list(generators))
        logits = self.classifier(decode(self.pipe.vae, z))
        return margin_loss(logits, labels, s.kappa), logits

    def run(self, prompts: Sequence[str], labels: Sequence[int], seeds: Sequence[int]) -> list[AttackResult]:
        """Attack each prompt (true class ``labels[i]``, noise stream seeded with ``seeds[i]``) independently; the
        batch only shares the UNet calls (Adam is per-coordinate, the loss a sum of per-sample terms)."""
        s, tok = self.settings, self.tokenizer
        prompts = list(prompts)
        layouts = [self.layout(p) for p in prompts]
        bodies = [body for body, _ in layouts]
        labels_t = torch.tensor(list(labels), device=self.device)
        generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]
        logits = torch.zeros(len(prompts), s.tokens, len(self.candidates), device=self.device, requires_grad=True)
        optimizer = torch.optim.Adam([logits], lr=s.lr)
        history = []
        for _ in range(s.iterations):
            latents = initial_latents(self.pipe, len(prompts), height=self.size, width=self.size,
                                      generator=generators, scheduler=self.scheduler)
            weights = gumbel_softmax(logits, s.tau, hard=s.straight_through, generators=generators)
            loss, _ = self.loss(bodies, weights, labels_t, latents, generators)
            optimizer.zero_grad(set_to_none=True)
            loss.sum().backward()
            optimizer.step()
            history.append(loss.detach().cpu())
        losses = torch.stack(history, 1).tolist()
        chosen = self.candidates[logits.detach().argmax(-1)].cpu().tolist()
        results = []
        for prompt, (body, cut), ids, curve in zip(prompts, layouts, chosen, losses):
            text = tok.decode(ids, skip_special_tokens=True).strip()
            base = tok.decode(body, skip_special_tokens=True).strip() if cut else prompt
            results.append(AttackResult(prompt=base, token_ids=ids, attack_text=text, final_prompt=f"{base} {text}",
                                        truncated=cut, roundtrip=tok(text, add_special_tokens=False).input_ids == ids,
                                        losses=[round(v, 4) for v in curve]))
        return results
