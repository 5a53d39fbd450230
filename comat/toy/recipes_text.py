"""Recipes of the toy zoo's image-to-text models: the BLIP and GIT captioners and the BLIP-VQA judge.

All three read the same small word vocabulary (``TOY_WORDS``: the toy grammar plus the question and answer
words) through a BERT tokenizer, which keeps their token tables tiny. Images get the CLIP normalisation of
the real checkpoints and a light augmentation (a 0-2 px crop resized back, as the captioner's jitter does,
and pixel noise), so the judges also read the text-to-image model's imperfect samples.

The captioners learn ``"a photography of " + prompt`` (what ``Captioner.log_prob`` scores) on renders of
prompts of every category. Their prompts cover every attribute-object combination, held-out pairs included,
and exclude only the evaluation prompt lists (``sample_open_batch``): a captioner trained on the train split
alone learns that held-out pairs never occur and, measured, prefers the swapped caption of 81% of the
unseen-pair evaluation scenes. The real captioners saw such pairs in pretraining, and CoMat's gain on unseen
prompts depends on the captioner knowing them. ``open_prompts = False`` restores the train split.

Shapes are what a small ViT learns last; two training-only signals bring them forward (see
``ObjectAttributeHead`` and ``_CaptionerRecipe``). The VQA judge learns the questions of
``comat.toy.quality`` on ground-truth renders, through the same encoder/decoder calls ``VqaJudge`` makes.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from transformers import (
    BertTokenizer,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipForQuestionAnswering,
    BlipImageProcessor,
    BlipProcessor,
    CLIPImageProcessor,
    GitConfig,
    GitForCausalLM,
    GitProcessor,
)

from comat.judges.vqa import answer_logits, encode_questions, question_states
from comat.models.captioners import DEFAULT_PREFIX, IGNORE_INDEX, token_log_probs
from comat.models.tokenizer import word_tokenizer
from comat.toy.pretrain import export_fp16
from comat.toy.prompts import (
    CATEGORIES,
    COLORS,
    RELATIONS,
    SHAPES,
    SIZES,
    TEXTURES,
    Mention,
    PromptSpec,
    evaluation_keys,
    random_spec,
)
from comat.toy.quality import scene_questions
from comat.toy.recipes import CLIP_MEAN, CLIP_STD, clip_normalize, corrupt
from comat.toy.world import SIZE, RenderedScene, realise, render, sample_batch

TOY_WORDS = sorted(
    {*SHAPES, *(Mention(s, count=2).text.split()[-1] for s in SHAPES), *COLORS, *TEXTURES, *SIZES,
     *(w for r in RELATIONS for w in r.split()), *DEFAULT_PREFIX.split(), "a", "an", "two", "three", "and",
     "is", "are", "there", "what", "how", "many", "object", "objects", "color", "shape", "texture", "size",
     "yes", "no", "?"}
)
MAX_TEXT_TOKENS = 40  # the longest toy caption with its prefix is ~27 tokens


def toy_word_tokenizer(directory: str | Path | None = None) -> BertTokenizer:
    return word_tokenizer(TOY_WORDS, directory or tempfile.mkdtemp(prefix="comat-toy-words-"))


def augment(images: torch.Tensor, rng: np.random.Generator, jitter: int = 2, noise: float = 0.03) -> torch.Tensor:
    """Half the images cropped by 0-``jitter`` px and resized back; Gaussian noise of std U(0, ``noise``)."""
    out = []
    for img in images:
        if rng.random() < 0.5:
            dh, dw = rng.integers(0, jitter + 1, 2)
            top, left = int(rng.integers(0, dh + 1)), int(rng.integers(0, dw + 1))
            crop = img[None, :, top : top + SIZE - dh, left : left + SIZE - dw]
            img = F.interpolate(crop, size=(SIZE, SIZE), mode="bicubic", align_corners=False, antialias=True)[0]
        out.append(img)
    x = torch.stack(out)
    sigma = torch.from_numpy(rng.uniform(0, noise, (len(x), 1, 1, 1))).float()
    x = x + sigma * torch.from_numpy(rng.standard_normal(x.shape)).float()
    return x.clamp(0, 1)


def sample_open_batch(n: int, rng: np.random.Generator, categories: Sequence[str] | None = None):
    """Like ``sample_batch``, with prompts over every attribute-object combination (held-out pairs included)
    except the evaluation prompt lists themselves."""
    cats = list(categories or CATEGORIES)
    rendered = []
    while len(rendered) < n:
        spec = random_spec(cats[rng.integers(len(cats))], rng)
        if spec.key() not in evaluation_keys():
            rendered.append(render(realise(spec, rng)))
    images = torch.from_numpy(np.stack([r.image for r in rendered])).permute(0, 3, 1, 2).float().div_(255)
    return images, [r.prompt for r in rendered], rendered


PATCH = 8
_AUX_CLASSES = {"shape": SHAPES, "color": COLORS, "texture": TEXTURES, "size": SIZES}


def object_patches(rendered: Sequence[RenderedScene]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per object of the batch: its visible pixels per ViT patch as pooling weights (rows sum to 1, ``[O, P]``),
    the index of its image (``[O]``) and its attributes (``[O, 4]``, the order of ``_AUX_CLASSES``)."""
    g = SIZE // PATCH
    weights, image, labels = [], [], []
    for b, r in enumerate(rendered):
        for o, m in zip(r.scene.objects, r.masks):
            cover = m.reshape(g, PATCH, g, PATCH).sum((1, 3)).reshape(-1).astype(np.float32)
            weights.append(cover / max(cover.sum(), 1.0))
            image.append(b)
            labels.append([vals.index(o.attributes[k]) for k, vals in _AUX_CLASSES.items()])
    return torch.from_numpy(np.stack(weights)), torch.tensor(image), torch.tensor(labels)


class ObjectAttributeHead(torch.nn.Module):
    """Training-only linear probe: each object's patch tokens, pooled by its mask, must give its attributes.

    Cross-entropy on captions (or answers) alone teaches the ViT colours quickly but shapes only after
    thousands of steps; this dense ground truth brings shape recognition forward (~0.8 object shape accuracy
    after 700 steps, against ~0.35 for a per-patch probe). Pooling is what the decoder's cross-attention
    does when it reads an object, so the probe asks for features the decoder can use. Not exported."""

    def __init__(self, hidden: int):
        super().__init__()
        self.sizes = [len(v) for v in _AUX_CLASSES.values()]
        self.proj = torch.nn.Linear(hidden, sum(self.sizes))

    def loss(self, patch_tokens: torch.Tensor, rendered: Sequence[RenderedScene]) -> tuple[torch.Tensor, float]:
        weights, image, labels = object_patches(rendered)
        pooled = torch.einsum("op,oph->oh", weights, patch_tokens[image])
        logits = self.proj(pooled).split(self.sizes, -1)
        loss = sum(F.cross_entropy(lg, labels[:, i]) for i, lg in enumerate(logits))
        return loss, (logits[0].argmax(-1) == labels[:, 0]).float().mean().item()


def _mention_words(spec: PromptSpec) -> list[tuple[int, bool]]:
    """Per prompt word: (mention index or -1, whether it is the mention's article)."""
    out: list[tuple[int, bool]] = []
    i = 0
    while i < len(spec.mentions):
        if out:
            out.append((-1, False))  # "and"
        group = [i, i + 1] if spec.relation and spec.relation[1] == i else [i]
        for k, j in enumerate(group):
            if k:
                out += [(-1, False)] * len(spec.relation[0].split())
            n = len(spec.mentions[j].text.split())
            out += [(j, True)] + [(j, False)] * (n - 1)
        i += len(group)
    return out


def attention_targets(rendered: Sequence[RenderedScene], length: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where a caption's cross-attention should look: at a position whose input word and next word both belong to
    one mention past its article ("red" before "circle"), the mention's objects, as patch weights ``[B, T, P]``,
    and the mask of such positions ``[B, T]``. ``offset``: token position of the prompt's first word."""
    weights = torch.zeros(len(rendered), length, (SIZE // PATCH) ** 2)
    used = torch.zeros(len(rendered), length, dtype=torch.bool)
    for b, r in enumerate(rendered):
        words = _mention_words(r.scene.spec)
        for w, ((j, article), (j_next, _)) in enumerate(zip(words, words[1:])):
            # Before its first attribute, which object a mention names is not decided yet: no target there.
            if j < 0 or article or j != j_next or offset + w >= length:
                continue
            cover = _cover(r, r.scene.objects_of(j))
            if cover is not None:
                weights[b, offset + w], used[b, offset + w] = cover, True
    return weights, used


def _cover(r: RenderedScene, objects: Sequence[int]) -> torch.Tensor | None:
    """The visible pixels of ``objects`` per ViT patch, summing to 1 (None when nothing is visible)."""
    g = SIZE // PATCH
    union = np.zeros((SIZE, SIZE), bool)
    for k in objects:
        union |= r.masks[k]
    cover = union.reshape(g, PATCH, g, PATCH).sum((1, 3)).reshape(-1).astype(np.float32)
    return torch.from_numpy(cover / cover.sum()) if cover.sum() > 0 else None


def _attention_loss(attention: torch.Tensor, where: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the attention over patches ``[B, T, P]`` against the target patches at the used positions.

    Teaching the decoder where a mention's object is, instead of leaving it to find that out from the caption
    loss, is what makes the captioners bind attributes within the CPU budget (pilot, BLIP: swap accuracy 0.55
    after 900 steps without it, 0.93 with it)."""
    return -(where * attention.clamp_min(1e-6).log()).sum(-1)[used].mean()


def _vision(hidden: int, layers: int) -> dict:
    # BLIP's default vision init (1e-10) leaves the position embeddings at zero; 0.02 learns faster from scratch.
    return dict(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers, num_attention_heads=4,
                image_size=SIZE, patch_size=PATCH, initializer_range=0.02)


def _blip_text(tok: BertTokenizer, hidden: int, layers: int) -> dict:
    return dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                num_attention_heads=4, encoder_hidden_size=hidden, max_position_embeddings=MAX_TEXT_TOKENS,
                bos_token_id=tok.convert_tokens_to_ids("[DEC]"), pad_token_id=tok.pad_token_id,
                sep_token_id=tok.sep_token_id, eos_token_id=tok.sep_token_id)


def _blip_processor(tok: BertTokenizer) -> BlipProcessor:
    image_processor = BlipImageProcessor(size={"height": SIZE, "width": SIZE}, image_mean=list(CLIP_MEAN),
                                         image_std=list(CLIP_STD), resample=3)
    return BlipProcessor(image_processor, tok)


def caption_batch(tok: BertTokenizer, prompts: list[str], bos: int, eos: int) -> tuple[torch.Tensor, ...]:
    """``[bos] prefix prompt [eos]`` right padded: ``input_ids``, ``attention_mask``, ``targets`` (-100 on padding),
    the sequence ``Captioner.log_prob`` scores."""
    rows = [[bos, *tok(DEFAULT_PREFIX + p.lower(), add_special_tokens=False).input_ids, eos] for p in prompts]
    n = max(map(len, rows))
    ids = torch.full((len(rows), n), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
    return ids, mask, ids.masked_fill(mask == 0, IGNORE_INDEX)


def _next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, float]:
    logits, targets = logits[:, :-1], targets[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)
    valid = targets != IGNORE_INDEX
    acc = ((logits.argmax(-1) == targets) & valid).sum().item() / max(1, valid.sum().item())
    return loss, acc


class _CaptionerRecipe:
    """Caption cross-entropy, a logistic loss on ``log p(true) - log p(attribute-swapped)`` (``corrupt``; the
    captioner is a binding judge, and cross-entropy alone learns grammar and colours long before it binds them
    to shapes) and the object-attribute probe on the ViT's patch tokens."""

    name: str
    requires: tuple[str, ...] = ()
    steps: int
    lr: float
    ema: float
    batch: int
    hidden: int
    vision_layers: int
    text_layers: int
    negative_weight = 1.0
    aux_weight = 1.0
    attention_weight = 1.0
    open_prompts = True

    def __init__(self) -> None:
        self.tokenizer = toy_word_tokenizer()

    def _model(self):
        raise NotImplementedError

    def build(self, zoo: Path) -> dict[str, torch.nn.Module]:
        return {self.name: self._model(), "aux": ObjectAttributeHead(self.hidden)}

    def _ids(self) -> tuple[int, int]:
        raise NotImplementedError

    def _vision(self, model) -> torch.nn.Module:
        raise NotImplementedError

    def _forward(self, model, pixel_values: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                 attend: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text logits ``[k * B, T, V]`` for ``k`` captions per image (rows ``j * B + i`` belong to image ``i``) and,
        with ``attend``, the last layer's head-mean attention of each text position over the patches ``[k * B, T, P]``."""
        raise NotImplementedError

    def loss(self, modules, rng):
        sample = sample_open_batch if self.open_prompts else sample_batch
        images, prompts, rendered = sample(self.batch, rng)
        negatives = [corrupt(r.scene.spec, rng).text for r in rendered]
        ids, mask, targets = caption_batch(self.tokenizer, prompts + negatives, *self._ids())
        model, seen = modules[self.name], []
        hook = self._vision(model).register_forward_hook(lambda m, i, out: seen.append(out.last_hidden_state))
        try:
            logits, attention = self._forward(model, clip_normalize(augment(images, rng)), ids, mask, self.attention_weight > 0)
        finally:
            hook.remove()
        n = len(prompts)
        loss, acc = _next_token_loss(logits[:n], targets[:n])
        logp = token_log_probs(logits[:, :-1], targets[:, 1:])
        margin = (logp[:n] - logp[n:])[torch.tensor([a != b for a, b in zip(prompts, negatives)])]
        aux, aux_acc = modules["aux"].loss(seen[0][:, 1:], rendered)
        loss = loss + self.negative_weight * F.softplus(-margin).mean() + self.aux_weight * aux
        logs = {"token_acc": acc, "swap_acc": (margin > 0).float().mean().item(), "object_shape_acc": aux_acc}
        if attention is not None:
            where, used = attention_targets(rendered, ids.shape[1], 1 + len(DEFAULT_PREFIX.split()))
            if used.any():
                att = _attention_loss(attention[:n], where, used)
                loss = loss + self.attention_weight * att
                logs["attention_ce"] = att.item()
        return loss, logs


class BlipCaptionerRecipe(_CaptionerRecipe):
    """``BlipForConditionalGeneration``: ViT encoder, BERT decoder cross-attending to the patches."""

    name, steps, lr, ema, batch = "blip", 3000, 1e-3, 0.99, 32
    hidden, vision_layers, text_layers = 96, 3, 3

    def _model(self):
        config = BlipConfig(vision_config=_vision(self.hidden, self.vision_layers),
                            text_config=_blip_text(self.tokenizer, self.hidden, self.text_layers),
                            projection_dim=self.hidden, image_text_hidden_size=self.hidden)
        return BlipForConditionalGeneration(config)

    def _vision(self, model):
        return model.vision_model

    def _ids(self) -> tuple[int, int]:
        return self.tokenizer.convert_tokens_to_ids("[DEC]"), self.tokenizer.sep_token_id

    def _forward(self, model, pixel_values, ids, mask, attend=False):
        # The ViT runs once per image; BlipForConditionalGeneration.forward would rerun it per caption.
        image_embeds = model.vision_model(pixel_values).last_hidden_state
        image_embeds = image_embeds.repeat(len(ids) // len(image_embeds), 1, 1)
        out = model.text_decoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=image_embeds,
                                 output_attentions=attend)
        return out.logits, out.cross_attentions[-1].mean(1)[..., 1:] if attend else None

    def export(self, modules, zoo: Path) -> None:
        export_fp16(modules[self.name], zoo / self.name)
        _blip_processor(self.tokenizer).save_pretrained(zoo / self.name)


class GitCaptionerRecipe(_CaptionerRecipe):
    """``GitForCausalLM``: CLIP-style ViT whose projected patches prefix one causal text transformer."""

    name, steps, lr, ema, batch = "git", 3000, 1e-3, 0.99, 32
    hidden, vision_layers, text_layers = 96, 3, 3

    def _vision(self, model):
        return model.git.image_encoder

    def _model(self):
        tok = self.tokenizer
        config = GitConfig(
            vision_config=_vision(self.hidden, self.vision_layers), vocab_size=len(tok), hidden_size=self.hidden,
            intermediate_size=4 * self.hidden, num_hidden_layers=self.text_layers, num_attention_heads=4,
            max_position_embeddings=MAX_TEXT_TOKENS, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id,
        )
        return GitForCausalLM(config)

    def _ids(self) -> tuple[int, int]:
        return self.tokenizer.cls_token_id, self.tokenizer.sep_token_id

    def _forward(self, model, pixel_values, ids, mask, attend=False):
        # GitModel repeats the image tokens over the k captions of each image itself.
        out = model(pixel_values=pixel_values, input_ids=ids, attention_mask=mask, output_attentions=attend)
        n_img = out.logits.shape[1] - ids.shape[1]
        attention = None
        if attend:  # text rows, patch columns (not CLS), renormalised: where among the patches it looks
            attention = out.attentions[-1].mean(1)[:, n_img:, 1:n_img]
            attention = attention / attention.sum(-1, keepdim=True).clamp_min(1e-9)
        return out.logits[:, n_img:], attention

    def export(self, modules, zoo: Path) -> None:
        export_fp16(modules[self.name], zoo / self.name)
        image_processor = CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE},
                                             image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), resample=3)
        GitProcessor(image_processor, self.tokenizer).save_pretrained(zoo / self.name)


class VqaRecipe:
    """``BlipForQuestionAnswering`` on ``comat.toy.quality`` questions about ground-truth renders, plus the
    captioners' object-attribute probe. Each image carries ``per_image`` questions: the ViT, most of a step's
    cost, runs once per image."""

    name, requires, steps, lr, ema, batch, per_image = "vqa", (), 9000, 1e-3, 0.99, 32, 4
    hidden, vision_layers, text_layers = 96, 3, 2
    aux_weight = 1.0
    attention_weight = 1.0

    def __init__(self) -> None:
        self.tokenizer = toy_word_tokenizer()

    def build(self, zoo: Path) -> dict[str, torch.nn.Module]:
        config = BlipConfig(vision_config=_vision(self.hidden, self.vision_layers),
                            text_config=_blip_text(self.tokenizer, self.hidden, self.text_layers),
                            projection_dim=self.hidden, image_text_hidden_size=self.hidden)
        return {self.name: BlipForQuestionAnswering(config), "aux": ObjectAttributeHead(self.hidden)}

    def loss(self, modules, rng):
        model, tok = modules[self.name], self.tokenizer
        images, _, rendered = sample_batch(self.batch, rng)
        questions = [q for r in rendered for q in scene_questions(r.scene, rng, self.per_image)]
        image_embeds = model.vision_model(clip_normalize(augment(images, rng))).last_hidden_state
        ids, mask = encode_questions(tok, [q.text for q in questions])
        states, attention = question_states(model, image_embeds.repeat_interleave(self.per_image, 0), ids, mask,
                                            return_attention=True)
        # Every answer is one word: [DEC] answer [SEP].
        answers = torch.tensor(tok.convert_tokens_to_ids([q.answer for q in questions]))
        dec = torch.stack([torch.full_like(answers, model.config.text_config.bos_token_id), answers,
                           torch.full_like(answers, tok.sep_token_id)], 1)
        logits = answer_logits(model, states, mask, dec)
        loss, _ = _next_token_loss(logits, dec)
        aux, aux_acc = modules["aux"].loss(image_embeds[:, 1:], rendered)
        loss = loss + self.aux_weight * aux
        # Where the question's referring words should look (the question encoder cross-attends to the image);
        # word w of the question is token 1 + w, after [ENC].
        where = torch.zeros(len(questions), ids.shape[1], (SIZE // PATCH) ** 2)
        used = torch.zeros(len(questions), ids.shape[1], dtype=torch.bool)
        for k, q in enumerate(questions):
            cover = _cover(rendered[k // self.per_image], q.refers) if q.refers else None
            if cover is not None:
                where[k, 1 + q.span[0] : 1 + q.span[1]], used[k, 1 + q.span[0] : 1 + q.span[1]] = cover, True
        logs = {}
        if used.any():
            att = _attention_loss(attention[..., 1:], where, used)
            loss, logs["attention_ce"] = loss + self.attention_weight * att, att.item()
        first = logits[:, 0].argmax(-1) == answers  # causal: position 0 is what the judge reads
        yes_no = torch.tensor([q.yes_no for q in questions])
        return loss, {"yes_no_acc": first[yes_no].float().mean().item(), "attr_acc": first[~yes_no].float().mean().item(),
                      "object_shape_acc": aux_acc, **logs}

    def export(self, modules, zoo: Path) -> None:
        export_fp16(modules[self.name], zoo / self.name)
        _blip_processor(self.tokenizer).save_pretrained(zoo / self.name)


TEXT_RECIPES = {r.name: r for r in (BlipCaptionerRecipe, GitCaptionerRecipe, VqaRecipe)}
