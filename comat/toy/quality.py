"""Ground-truth questions about toy scenes, and the zoo's quality measurements that use them.

Question kinds (the answer is always one word):

* yes/no: ``phrase`` ("a big red circle?", T2I-CompBench's noun-phrase questions), ``exists`` ("is there a
  red circle?", "are there two circles?") and ``verify`` ("is the circle red?", DPG-Bench style);
* attribute (TIFA style, free-form): ``color`` ("what color is the big circle?"), ``shape`` ("what shape is
  the red object?"), ``texture``, ``size`` and ``count`` ("how many circles are there?", digits 0-3).

Yes and no are equally likely. Negatives are hard: a present object's phrase with one attribute changed
(preferably to a value another object has, i.e. a binding error), a wrong count, or an absent shape.
A singular phrase is true when at least one object matches it, a plural one when exactly that many do.
Referents ("the big circle", "the red object") are always unique in the scene.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np
import torch

from comat.toy.prompts import CATEGORIES, COLORS, SHAPES, SIZES, TEXTURES, Mention
from comat.toy.world import Scene, render, sample_scene

YES_NO_KINDS = ("phrase", "exists", "verify")
ATTRIBUTE_KINDS = ("color", "shape", "texture", "size", "count")
KIND_WEIGHTS = {"phrase": 0.25, "exists": 0.15, "verify": 0.15, "color": 0.12, "shape": 0.10, "count": 0.10,
                "texture": 0.07, "size": 0.06}
VALUES = {"shape": SHAPES, "color": COLORS, "texture": TEXTURES, "size": SIZES}
_ORDER = ("size", "texture", "color", "shape")  # word order of a noun phrase
SWAP_CATEGORIES = ("color", "shape", "texture", "complex")


@dataclass(frozen=True)
class Question:
    """``refers``: the objects the words ``span`` (word indices, end exclusive) of the question are about (for a
    false phrase, the object it misdescribes); training uses them to tell the judge where to look."""

    text: str
    answer: str
    kind: str
    refers: tuple[int, ...] = ()
    span: tuple[int, int] = (0, 0)

    @property
    def yes_no(self) -> bool:
        return self.kind in YES_NO_KINDS


def _pick(rng: np.random.Generator, options: Sequence):
    return options[int(rng.integers(len(options)))]


def _attrs(scene: Scene) -> list[dict[str, str]]:
    return [o.attributes for o in scene.objects]


def _matching(m: Mention, objs: list[dict[str, str]]) -> tuple[int, ...]:
    return tuple(i for i, o in enumerate(objs) if all(getattr(m, k) in (None, o[k]) for k in _ORDER))


def _n_matching(m: Mention, objs: list[dict[str, str]]) -> int:
    return len(_matching(m, objs))


def _phrase_for(o: dict[str, str], rng: np.random.Generator) -> Mention:
    # Colour is what prompts usually say; texture and size less often (as in the prompt sets).
    return Mention(o["shape"], o["color"] if rng.random() < 0.75 else None,
                   o["texture"] if rng.random() < 0.3 else None, o["size"] if rng.random() < 0.3 else None)


def _wrong_value(kind: str, current: str, objs: list[dict[str, str]], rng: np.random.Generator) -> str:
    others = [o[kind] for o in objs if o[kind] != current]
    if others and rng.random() < 0.6:  # a value another object has: a binding error
        return _pick(rng, others)
    return _pick(rng, [v for v in VALUES[kind] if v != current])


def _phrase(objs: list[dict[str, str]], rng: np.random.Generator, yes: bool) -> tuple[Mention, tuple[int, ...]] | None:
    """A noun phrase that is true (``yes``) or false of the scene, and the objects it is about: those it
    matches, for a false phrase the objects it was made from (none for an absent shape)."""
    i = int(rng.integers(len(objs)))
    o = objs[i]
    if rng.random() < 0.2:  # plural: exact counts
        m = Mention(o["shape"], o["color"] if rng.random() < 0.5 else None)
        about = _matching(m, objs)
        if not yes:
            return dataclasses.replace(m, count=_pick(rng, [c for c in (2, 3) if c != len(about)])), about
        if len(about) >= 2:
            return dataclasses.replace(m, count=len(about)), about
    if yes:
        m = _phrase_for(o, rng)
        return m, _matching(m, objs)
    if rng.random() < 0.25:
        absent = [s for s in SHAPES if all(x["shape"] != s for x in objs)]
        return Mention(_pick(rng, absent), _pick(rng, COLORS) if rng.random() < 0.6 else None), ()
    for _ in range(20):
        m = _phrase_for(o, rng)
        stated = [k for k in _ORDER if getattr(m, k)]
        kind = _pick(rng, stated)
        m = dataclasses.replace(m, **{kind: _wrong_value(kind, getattr(m, kind), objs, rng)})
        if _n_matching(m, objs) == 0:
            return m, (i,)
    return None


def _referent(objs: list[dict[str, str]], i: int, avoid: str, rng: np.random.Generator) -> str | None:
    """"the <words>" naming object ``i`` uniquely without using attribute ``avoid``."""
    if avoid == "shape":
        options = [(k,) for k in ("color", "size", "texture")] + [("size", "color")]
        noun = "object"
    else:
        options = [("shape",)] + [(k, "shape") for k in ("color", "size", "texture") if k != avoid]
        noun = None
    unique = [ks for ks in options if sum(all(x[k] == objs[i][k] for k in ks) for x in objs) == 1]
    if not unique:
        return None
    ks = _pick(rng, unique)
    words = [objs[i][k] for k in _ORDER if k in ks] + ([noun] if noun else [])
    return "the " + " ".join(words)


def random_question(scene: Scene, rng: np.random.Generator, kind: str) -> Question | None:
    """One question of ``kind`` about ``scene`` with its ground-truth answer; None when the scene has none."""
    objs = _attrs(scene)
    if kind in ("phrase", "exists"):
        yes = bool(rng.random() < 0.5)
        found = _phrase(objs, rng, yes)
        if found is None:
            return None
        m, about = found
        start = 0 if kind == "phrase" else 2
        text = f"{m.text}?" if kind == "phrase" else f"{'is' if m.count == 1 else 'are'} there {m.text}?"
        return Question(text, "yes" if yes else "no", kind, about, (start, start + len(m.text.split())))
    i = int(rng.integers(len(objs)))
    if kind == "verify":
        attr = _pick(rng, ("color", "color", "color", "texture", "size"))
        ref = _referent(objs, i, attr, rng)
        if ref is None:
            return None
        yes = bool(rng.random() < 0.5)
        value = objs[i][attr] if yes else _wrong_value(attr, objs[i][attr], objs, rng)
        return Question(f"is {ref} {value}?", "yes" if yes else "no", kind, (i,), (1, 1 + len(ref.split())))
    if kind in ("color", "shape", "texture", "size"):
        ref = _referent(objs, i, kind, rng)
        if ref is None:
            return None
        return Question(f"what {kind} is {ref}?", objs[i][kind], kind, (i,), (3, 3 + len(ref.split())))
    if kind == "count":
        r = rng.random()
        if r < 0.15:
            color = _pick(rng, COLORS)
            refers = tuple(k for k, o in enumerate(objs) if o["color"] == color)
            return Question(f"how many {color} objects are there?", str(len(refers)), kind, refers, (2, 4))
        shape = _pick(rng, SHAPES) if r < 0.35 else objs[i]["shape"]
        plural = Mention(shape, count=2).text.split()[-1]
        refers = tuple(k for k, o in enumerate(objs) if o["shape"] == shape)
        return Question(f"how many {plural} are there?", str(len(refers)), kind, refers, (2, 3))
    raise ValueError(f"unknown question kind {kind!r}")


def scene_questions(scene: Scene, rng: np.random.Generator, n: int,
                    weights: dict[str, float] | None = None) -> list[Question]:
    """``n`` random questions about ``scene``, kinds drawn by ``weights`` (default ``KIND_WEIGHTS``)."""
    weights = weights or KIND_WEIGHTS
    kinds, p = list(weights), np.array(list(weights.values()), float)
    out: list[Question] = []
    while len(out) < n:
        q = random_question(scene, rng, kinds[rng.choice(len(kinds), p=p / p.sum())])
        if q is not None:
            out.append(q)
    return out


# ---------------------------------------------------------------------------------------------
# Quality measurements (held-out eval-split scenes; ``comat toy eval-zoo`` reuses them).

class _Scorer(Protocol):
    def log_prob(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor: ...


class _Judge(Protocol):
    def yes_probability(self, images: torch.Tensor, questions: list[str]) -> torch.Tensor: ...

    def answer(self, images: torch.Tensor, questions: list[str]) -> list[str]: ...


def _eval_scenes(n: int, seed: int, categories: Sequence[str], split: str = "eval") -> list[Scene]:
    rng = np.random.default_rng([seed, 0xE7A1])
    return [sample_scene(categories[k % len(categories)], rng, split) for k in range(n)]


def _images(scenes: Sequence[Scene]) -> torch.Tensor:
    arr = np.stack([render(s).image for s in scenes])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255)


@torch.no_grad()
def captioner_swap_accuracy(captioner: _Scorer, n_scenes: int = 400, seed: int = 0,
                            categories: Sequence[str] = SWAP_CATEGORIES, split: str = "eval",
                            batch_size: int = 64) -> float:
    """Share of held-out scenes (prompts of ``split``) where ``log p(true prompt)`` beats an attribute-swapped
    prompt (``corrupt``)."""
    from comat.toy.recipes import corrupt

    scenes = _eval_scenes(n_scenes, seed, categories, split)
    rng = np.random.default_rng([seed, 0x5A9])
    negatives = [corrupt(s.spec, rng).text for s in scenes]
    keep = [k for k, s in enumerate(scenes) if negatives[k] != s.prompt]
    wins = 0
    for start in range(0, len(keep), batch_size):
        idx = keep[start : start + batch_size]
        images = _images([scenes[k] for k in idx])
        true = captioner.log_prob(images, [scenes[k].prompt for k in idx])
        swapped = captioner.log_prob(images, [negatives[k] for k in idx])
        wins += int((true > swapped).sum())
    return wins / max(1, len(keep))


@torch.no_grad()
def vqa_accuracy(judge: _Judge, n_scenes: int = 300, seed: int = 0, questions_per_scene: int = 6,
                 categories: Sequence[str] = CATEGORIES, batch_size: int = 64) -> dict:
    """Accuracy on held-out renders: yes/no by ``yes_probability > 0.5``, attributes by exact match of ``answer``.

    Returns ``accuracy`` (all questions), ``yes_no``, ``attribute``, ``per_kind`` and ``n_questions``.
    """
    scenes = _eval_scenes(n_scenes, seed, categories)
    rng = np.random.default_rng([seed, 0x0A])
    pairs = [(k, q) for k, s in enumerate(scenes) for q in scene_questions(s, rng, questions_per_scene)]
    images = _images(scenes)
    correct: dict[str, list[bool]] = {}
    for yes_no in (True, False):
        items = [(k, q) for k, q in pairs if q.yes_no == yes_no]
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            imgs = images[[k for k, _ in chunk]]
            texts = [q.text for _, q in chunk]
            if yes_no:
                got = ["yes" if p > 0.5 else "no" for p in judge.yes_probability(imgs, texts).tolist()]
            else:
                got = [a.strip().lower() for a in judge.answer(imgs, texts)]
            for (_, q), a in zip(chunk, got):
                correct.setdefault(q.kind, []).append(a == q.answer)
    flat = lambda kinds: [c for k in kinds for c in correct.get(k, [])]  # noqa: E731
    mean = lambda xs: float(np.mean(xs)) if xs else float("nan")  # noqa: E731
    return {"accuracy": mean(flat(correct)), "yes_no": mean(flat(YES_NO_KINDS)),
            "attribute": mean(flat(ATTRIBUTE_KINDS)), "per_kind": {k: mean(v) for k, v in sorted(correct.items())},
            "n_questions": len(pairs)}
