"""The toy world's language: vocabulary, prompt grammar, prompt sets per category and their splits.

A prompt is a ``PromptSpec``: noun phrases (``Mention``) plus at most one relation between two
singular mentions that are adjacent in the text. ``PromptSpec.text`` writes it, ``parse_prompt``
reads it back, so benchmark code can recover the ground-truth attributes of any prompt string.

Grammar (one relation at most, relation subject = the earlier mention)::

    prompt  := chunk (" and " chunk)*
    chunk   := np | np " " RELATION " " np
    np      := ("a"|"an"|"two"|"three") [size] [texture] [color] shape["s"|"es"]

Unspecified attributes are free in the image: colour random, size random, texture plain.

Splits. Multi-object prompts containing a held-out attribute-object pair (``HELD_OUT``) never occur
in training: they form ``eval_unseen``. Of the remaining ("seen") prompts, those whose canonical
content hashes to 0 mod 5 form ``eval_seen`` (the canonical key ignores word order and mirrored
relations, so "A on the left of B" and "B on the right of A" always fall on the same side); the
rest is ``train``. Single-object prompts are exempt from the held-out rule (the base model must
learn every colour x shape): all one-attribute singles are train, and multi-attribute singles
hashing to 0 mod 3 are eval. ``open`` (every combination, held-out pairs included, except the evaluation
prompts) follows the rule the captioners learn under; CoMat trains on it with ``prompts=toy-open``.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from comat.core.errors import ComatError

SHAPES = ("circle", "square", "triangle", "cross")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
TEXTURES = ("plain", "striped", "dotted")
SIZES = ("small", "big")
SPATIAL_RELATIONS = ("on the left of", "on the right of", "on the top of", "on the bottom of", "next to")
NON_SPATIAL_RELATIONS = ("in front of", "behind")
RELATIONS = SPATIAL_RELATIONS + NON_SPATIAL_RELATIONS
CATEGORIES = ("single", "color", "shape", "texture", "spatial", "non_spatial", "complex", "counting")
SPLITS = ("train", "eval", "eval_seen", "eval_unseen", "open")

# Held-out (attribute, shape) pairs: absent from every multi-object training prompt. Each colour
# loses one shape (colour i -> shape (i + 2) mod 4), so every shape keeps >= 4 seen colours.
HELD_OUT: dict[str, frozenset[tuple[str, str]]] = {
    "color": frozenset({("red", "triangle"), ("green", "cross"), ("blue", "circle"),
                        ("yellow", "square"), ("purple", "triangle"), ("orange", "cross")}),
    "texture": frozenset({("striped", "circle"), ("dotted", "triangle")}),
    "size": frozenset({("big", "triangle"), ("small", "cross")}),
}

EVAL_SEEN_PER_CATEGORY = 40
EVAL_UNSEEN_PER_CATEGORY = 40
TRAIN_PER_CATEGORY = 500

_COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
_PLURALS = {s: s + ("es" if s.endswith("s") else "s") for s in SHAPES}


@dataclass(frozen=True)
class Mention:
    """A noun phrase: ``count`` objects of one shape; None attributes are left free by the prompt."""

    shape: str
    color: str | None = None
    texture: str | None = None
    size: str | None = None
    count: int = 1

    @property
    def text(self) -> str:
        words = [w for w in (self.size, self.texture, self.color) if w]
        words.append(self.shape if self.count == 1 else _PLURALS[self.shape])
        article = _COUNT_WORDS[self.count]
        if self.count == 1 and words[0][0] in "aeiou":
            article = "an"
        return " ".join([article, *words])

    def pairs(self) -> list[tuple[str, tuple[str, str]]]:
        """(kind, (attribute, shape)) pairs this phrase binds, for the held-out rule."""
        return [(k, (v, self.shape)) for k, v in (("color", self.color), ("texture", self.texture),
                                                   ("size", self.size)) if v]

    def _key(self) -> str:
        return f"{self.count}:{self.size}:{self.texture}:{self.color}:{self.shape}"


@dataclass(frozen=True)
class PromptSpec:
    """A prompt as structure. ``relation`` is (phrase, subject mention, object mention)."""

    category: str
    mentions: tuple[Mention, ...]
    relation: tuple[str, int, int] | None = None

    @property
    def text(self) -> str:
        chunks, i = [], 0
        while i < len(self.mentions):
            if self.relation and self.relation[1] == i:
                chunks.append(f"{self.mentions[i].text} {self.relation[0]} {self.mentions[i + 1].text}")
                i += 2
            else:
                chunks.append(self.mentions[i].text)
                i += 1
        return " and ".join(chunks)

    @property
    def n_objects(self) -> int:
        return sum(m.count for m in self.mentions)

    def key(self) -> str:
        """Canonical content: equal for prompts that say the same thing in another order."""
        keys = [m._key() for m in self.mentions]
        rel = ""
        if self.relation:
            phrase, a, b = self.relation
            mirrored = {"on the right of": "on the left of", "on the bottom of": "on the top of",
                        "behind": "in front of"}
            if phrase in mirrored:
                phrase, a, b = mirrored[phrase], b, a
            pair = [keys[a], keys[b]]
            if phrase == "next to":
                pair.sort()
            rel = f"{phrase}({pair[0]},{pair[1]})"
            keys = [k for i, k in enumerate(keys) if i not in (a, b)]
        return "|".join(sorted(keys)) + "|" + rel

    def is_unseen(self) -> bool:
        """True when a multi-object prompt binds a held-out attribute-object pair."""
        if self.category == "single":
            return False
        return any(p in HELD_OUT[k] for m in self.mentions for k, p in m.pairs())


def split_of(spec: PromptSpec) -> str:
    """'train', 'eval_seen' or 'eval_unseen' (see the module docstring for the rule)."""
    h = zlib.crc32(spec.key().encode())
    if spec.category == "single":
        n_attrs = len(spec.mentions[0].pairs())
        return "eval_seen" if n_attrs >= 2 and h % 3 == 0 else "train"
    if spec.is_unseen():
        return "eval_unseen"
    return "eval_seen" if h % 5 == 0 else "train"


# ---------------------------------------------------------------------------------------------
# Random prompt generators, one per category.

def _pick(rng: np.random.Generator, options, k: int = 1) -> list:
    return [options[i] for i in rng.choice(len(options), size=k, replace=False)]


def _maybe(rng: np.random.Generator, p: float, options) -> str | None:
    return options[rng.integers(len(options))] if rng.random() < p else None


def _gen_single(rng):
    tex = _maybe(rng, 0.35, TEXTURES[1:])  # "plain" is the default look, never said of singles
    return (Mention(_pick(rng, SHAPES)[0], _maybe(rng, 0.8, COLORS), tex, _maybe(rng, 0.35, SIZES)),), None


def _gen_color(rng):
    s, c = _pick(rng, SHAPES, 2), _pick(rng, COLORS, 2)
    return (Mention(s[0], c[0]), Mention(s[1], c[1])), None


def _gen_shape(rng):
    s, z = _pick(rng, SHAPES, 2), _pick(rng, SIZES, 2)
    return tuple(Mention(s[i], _maybe(rng, 0.5, COLORS), size=z[i]) for i in range(2)), None


def _gen_texture(rng):
    s, t = _pick(rng, SHAPES, 2), _pick(rng, TEXTURES, 2)
    return tuple(Mention(s[i], _maybe(rng, 0.5, COLORS), t[i]) for i in range(2)), None


def _gen_spatial(rng):
    s = _pick(rng, SHAPES, 2)
    ms = tuple(Mention(s[i], _maybe(rng, 0.5, COLORS)) for i in range(2))
    return ms, (_pick(rng, SPATIAL_RELATIONS)[0], 0, 1)


def _gen_non_spatial(rng):
    ms, _ = _gen_color(rng)  # distinct colours keep the occlusion visible
    return ms, (_pick(rng, NON_SPATIAL_RELATIONS)[0], 0, 1)


def _gen_complex(rng):
    s, c = _pick(rng, SHAPES, 3), _pick(rng, COLORS, 3)
    ms = []
    for i in range(3):
        extra = rng.integers(3)  # nothing / size / texture on top of the colour
        ms.append(Mention(s[i], c[i] if rng.random() < 0.85 else None,
                          _pick(rng, TEXTURES[1:])[0] if extra == 2 else None,
                          _pick(rng, SIZES)[0] if extra == 1 else None))
    i = int(rng.integers(2))  # "A rel B and C" or "A and B rel C"
    return tuple(ms), (_pick(rng, RELATIONS)[0], i, i + 1)


def _gen_counting(rng):
    s = _pick(rng, SHAPES, 2)
    if rng.random() < 0.4:
        return (Mention(s[0], _maybe(rng, 0.7, COLORS), count=int(rng.integers(2, 4))),), None
    ms = [Mention(s[0], _maybe(rng, 0.7, COLORS), count=2), Mention(s[1], _maybe(rng, 0.7, COLORS))]
    return tuple(ms[::-1] if rng.random() < 0.5 else ms), None


_GENERATORS = {"single": _gen_single, "color": _gen_color, "shape": _gen_shape, "texture": _gen_texture,
               "spatial": _gen_spatial, "non_spatial": _gen_non_spatial, "complex": _gen_complex,
               "counting": _gen_counting}


def random_spec(category: str, rng: np.random.Generator) -> PromptSpec:
    """A random prompt of ``category`` from any split."""
    _check_category(category)
    mentions, rel = _GENERATORS[category](rng)
    return PromptSpec(category, mentions, rel)


# ---------------------------------------------------------------------------------------------
# Prompt sets.

@lru_cache(maxsize=None)
def _collect(category: str, split: str, n: int) -> tuple[PromptSpec, ...]:
    # A fixed seed per (category, split) makes the lists reproducible; small spaces saturate.
    rng = np.random.default_rng(zlib.crc32(f"{category}/{split}".encode()))
    found: dict[str, PromptSpec] = {}
    misses = 0
    while len(found) < n and misses < 3000:
        spec = random_spec(category, rng)
        inside = spec.key() not in evaluation_keys() if split == "open" else split_of(spec) == split
        if inside and spec.text not in found:
            found[spec.text], misses = spec, 0
        else:
            misses += 1
    return tuple(found.values())


@lru_cache(maxsize=1)
def evaluation_keys() -> frozenset[str]:
    """Canonical keys of every category's evaluation prompts."""
    return frozenset(spec.key() for c in CATEGORIES for spec in prompt_specs(c, "eval"))


def prompt_specs(category: str, split: str = "eval") -> list[PromptSpec]:
    """Deterministic prompt set. 'eval' = eval_seen + eval_unseen (singles: all seen); 'open' = prompts over
    every attribute-object combination, held-out pairs included, except the evaluation prompts themselves."""
    _check_category(category)
    if split not in SPLITS:
        raise ComatError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if split == "eval":
        return prompt_specs(category, "eval_seen") + prompt_specs(category, "eval_unseen")
    if category == "single" and split == "eval_unseen":
        return []
    n = {"train": TRAIN_PER_CATEGORY, "open": TRAIN_PER_CATEGORY, "eval_seen": EVAL_SEEN_PER_CATEGORY,
         "eval_unseen": EVAL_UNSEEN_PER_CATEGORY}[split]
    if category == "single" and split == "eval_seen":  # singles have no unseen half
        n += EVAL_UNSEEN_PER_CATEGORY
    return list(_collect(category, split, n))


def prompts(category: str, split: str = "eval") -> list[str]:
    """Prompt strings of ``prompt_specs(category, split)``."""
    return [s.text for s in prompt_specs(category, split)]


def sample_spec(category: str, rng: np.random.Generator, split: str = "train") -> PromptSpec:
    """A prompt of ``split``: fresh random train prompts (unbounded variety), eval from the fixed lists."""
    if split == "train":
        while True:
            spec = random_spec(category, rng)
            if split_of(spec) == "train":
                return spec
    specs = prompt_specs(category, split)
    if not specs:
        raise ComatError(f"category {category!r} has no {split} prompts")
    return specs[rng.integers(len(specs))]


# ---------------------------------------------------------------------------------------------
# Parsing.

_NP = re.compile(r"(a|an|two|three) (?:(small|big) )?(?:(plain|striped|dotted) )?"
                 r"(?:(red|green|blue|yellow|purple|orange) )?(circles?|squares?|triangles?|cross(?:es)?)")
_REL = re.compile(" (" + "|".join(RELATIONS) + ") ")


def _parse_np(text: str, prompt: str) -> Mention:
    m = _NP.fullmatch(text)
    if not m:
        raise ComatError(f"cannot parse {text!r} in toy prompt {prompt!r}: expected e.g. 'a big striped red circle'")
    article, size, texture, color, noun = m.groups()
    count = {"a": 1, "an": 1, "two": 2, "three": 3}[article]
    shape = noun if noun in SHAPES else next(s for s, p in _PLURALS.items() if p == noun)
    mention = Mention(shape, color, texture, size, count)
    if mention.text != text:  # article/plural agreement
        raise ComatError(f"toy prompt {prompt!r}: write {mention.text!r}, not {text!r}")
    return mention


def _infer_category(mentions: tuple[Mention, ...], relation) -> str:
    if any(m.count > 1 for m in mentions):
        return "counting"
    if len(mentions) == 1:
        return "single"
    if len(mentions) == 3:
        return "complex"
    if relation:
        return "spatial" if relation[0] in SPATIAL_RELATIONS else "non_spatial"
    if all(m.size for m in mentions):
        return "shape"
    if all(m.texture for m in mentions):
        return "texture"
    return "color"


def parse_prompt(prompt: str, category: str | None = None) -> PromptSpec:
    """Read a toy prompt back into its spec; the category is inferred from the structure if not given."""
    mentions: list[Mention] = []
    relation = None
    for chunk in prompt.strip().split(" and "):
        parts = _REL.split(chunk)
        if len(parts) == 3 and relation is None:
            relation = (parts[1], len(mentions), len(mentions) + 1)
            mentions += [_parse_np(parts[0], prompt), _parse_np(parts[2], prompt)]
        elif len(parts) == 1:
            mentions.append(_parse_np(chunk, prompt))
        else:
            raise ComatError(f"toy prompt {prompt!r}: at most one relation is allowed")
    if relation and any(mentions[i].count != 1 for i in relation[1:]):
        raise ComatError(f"toy prompt {prompt!r}: relations link single objects only")
    if sum(m.count for m in mentions) > 3:
        raise ComatError(f"toy prompt {prompt!r}: a scene holds at most 3 objects")
    mentions_t = tuple(mentions)
    return PromptSpec(category or _infer_category(mentions_t, relation), mentions_t, relation)


def _check_category(category: str) -> None:
    if category not in CATEGORIES:
        raise ComatError(f"unknown toy category {category!r}; use one of {', '.join(CATEGORIES)}")


__all__ = ["SHAPES", "COLORS", "TEXTURES", "SIZES", "RELATIONS", "SPATIAL_RELATIONS", "NON_SPATIAL_RELATIONS",
           "CATEGORIES", "SPLITS", "HELD_OUT", "Mention", "PromptSpec", "split_of", "random_spec",
           "prompt_specs", "prompts", "sample_spec", "parse_prompt"]
