"""Captioner sensitivity (paper Appendix B.3 and Table 7): does ``log p(caption | image)`` notice
when a caption is corrupted?

For an image I with its correct caption P and a corrupted caption P'::

    S = (log p(P|I) - log p(P'|I)) / |log p(P|I)|

per triple (I, P, P'), averaged per corruption kind and over all triples ("overall", the paper's single number).
A captioner blind to the corruption scores 0; a larger S is a sharper concept-activation signal for CoMat.

``log p`` is what training's ``L_i2t`` uses (``Captioner.log_prob``): the SUM (paper eq. 2) of the log-probabilities
of the caption tokens after the prefix ``"a photography of "`` (the prefix is conditioning, not scored) plus the
end-of-caption token; no label smoothing, no crop jitter. P and P' share the prefix and the end token.

Corruptions (the paper names attribute and relation sensitivity; the third kind here is noun replacement):

* ``attribute``: swap the attribute words of two nouns ("a red car and a blue bench" -> "a blue car and a red
  bench"). Both nouns must carry attributes, and the nouns and the attribute words must differ: otherwise the
  swapped caption says the same thing.
* ``relation``: swap the subject and the object of a relation, whole noun phrases ("a red cat on a mat" -> "a mat
  on a red cat"). Symmetric relations (:data:`SYMMETRIC_RELATIONS`) are skipped: swapping their sides is no
  corruption.
* ``noun``: replace one noun by a noun of the test set's vocabulary that the caption does not contain (same number;
  "a"/"an" follows the new noun).

A caption that admits no corruption of a kind is skipped for that kind and counted. Where it admits several, one is
drawn with a generator seeded by (seed, item index). Toy captions are corrupted on the toy grammar (exact); real
captions on their spaCy parse, with the entity rules of ``comat.models.parsing`` (a noun, its modifiers, the filtered
abstract and relation nouns).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch

from comat.core.errors import ComatError
from comat.evaluation.benchmark import Benchmark, Sample
from comat.evaluation.registry import register
from comat.models.captioners import DEFAULT_PREFIX, KNOWN_KINDS
from comat.models.parsing import FILTERED_NOUNS, RELATION_NOUNS, is_filtered, load_spacy, noun_entities
from comat.toy.prompts import CATEGORIES, Mention, PromptSpec, parse_prompt

if TYPE_CHECKING:
    from spacy.language import Language
    from spacy.tokens import Doc, Span, Token

KINDS = ("attribute", "relation", "noun")
#: Relations whose two sides can be exchanged without changing the meaning.
SYMMETRIC_RELATIONS = ("next to", "near", "beside", "close to", "alongside")
#: Paper Table 7: captioner, parameters, sensitivity score.
PAPER_TABLE7 = (("BLIP", "469M", 0.1987), ("GIT", "394M", 0.1728), ("LLaVA", "7.2B", 0.1483))
#: The checkpoint a kind stands for when none is given (the paper's captioners).
PAPER_CAPTIONERS = {"blip": "Salesforce/blip-image-captioning-large", "git": "microsoft/git-large-coco",
                    "llava": "llava-hf/llava-1.5-7b-hf"}
TOY_CAPTIONERS = ("toy/blip", "toy/git")
DATA_FORM = '{"image": PATH relative to the file, "caption": TEXT}'
TABLE_COLUMNS = ("source", "captioner", "parameters", "S", "S attribute", "S relation", "S noun", "triples")

Corrupter = Callable[[str, str, np.random.Generator], "str | None"]


@dataclasses.dataclass(frozen=True, eq=False)
class Item:
    """One image with its correct caption. ``pixels``: the toy render; real images are read from ``image``."""

    id: str
    caption: str
    image: str
    category: str = ""
    pixels: np.ndarray | None = None

    def array(self) -> np.ndarray:
        if self.pixels is not None:
            return self.pixels
        from comat.generation.engine import load_image

        try:
            return np.asarray(load_image(Path(self.image)))
        except OSError as e:  # PIL's UnidentifiedImageError is an OSError
            raise ComatError(f"{self.image} ({self.id} of the data file) is not a readable image ({type(e).__name__}); "
                             "replace it or drop its line") from None


# --- test sets ----------------------------------------------------------------------------------------------


def read_pairs(path: Path) -> list[Item]:
    """The (image, caption) pairs of a JSONL file, one ``{"image": PATH, "caption": TEXT}`` per line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ComatError(f"--data {path}: no such file; pass a JSONL file with one {DATA_FORM} per line")
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ComatError(f"{where}: not JSON ({e.msg}); write one {DATA_FORM} per line") from None
        if not isinstance(row, dict):
            raise ComatError(f"{where}: a JSON {type(row).__name__}, not an object; write {DATA_FORM}")
        for key in ("image", "caption"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise ComatError(f'{where}: no "{key}" string; write {DATA_FORM}')
        image = path.parent / Path(row["image"]).expanduser()
        if not image.is_file():
            raise ComatError(f"{where}: image {row['image']!r} not found at {image}; paths are relative to the JSONL file")
        items.append(Item(f"line{number}", row["caption"].strip(), str(image)))
    if not items:
        raise ComatError(f"--data {path}: no pairs; write one {DATA_FORM} per line")
    return items


def toy_items(n: int, seed: int) -> list[Item]:
    """Renders of toy evaluation prompts, categories in turn, with their true captions."""
    from comat.toy.world import render, sample_scene

    if n < 1:
        raise ComatError(f"n={n}: the toy test set needs at least one scene")
    rng = np.random.default_rng([seed, 0x5E45])
    items = []
    for k in range(n):
        scene = sample_scene(CATEGORIES[k % len(CATEGORIES)], rng, "eval")
        items.append(Item(f"toy{k}", scene.prompt, f"toy scene {k}", scene.category, render(scene).image))
    return items


# --- corruptions: toy grammar -------------------------------------------------------------------------------

_ATTRIBUTES = ("size", "texture", "color")


def _attribute_words(m: Mention) -> tuple[str | None, ...]:
    return tuple(getattr(m, k) for k in _ATTRIBUTES)


class ToyCorruptions:
    """Corruptions of toy captions, made on their ``PromptSpec`` (every toy caption parses exactly)."""

    def __init__(self, captions: Sequence[str]):
        self.specs = {c: parse_prompt(c) for c in dict.fromkeys(captions)}
        self.nouns = sorted({m.shape for s in self.specs.values() for m in s.mentions})

    def __call__(self, caption: str, kind: str, rng: np.random.Generator) -> str | None:
        spec = self.specs.get(caption) or parse_prompt(caption)
        mentions = list(spec.mentions)
        if kind == "attribute":
            words = [_attribute_words(m) for m in mentions]
            pairs = [(i, j) for i, j in combinations(range(len(mentions)), 2)
                     if mentions[i].shape != mentions[j].shape and any(words[i]) and any(words[j]) and words[i] != words[j]]
            if not pairs:
                return None
            i, j = pairs[rng.integers(len(pairs))]
            mentions[i], mentions[j] = (dataclasses.replace(mentions[i], **dict(zip(_ATTRIBUTES, words[j]))),
                                        dataclasses.replace(mentions[j], **dict(zip(_ATTRIBUTES, words[i]))))
        elif kind == "relation":
            if spec.relation is None or spec.relation[0] in SYMMETRIC_RELATIONS:
                return None
            _, a, b = spec.relation
            mentions[a], mentions[b] = mentions[b], mentions[a]
        elif kind == "noun":
            options = [s for s in self.nouns if s not in {m.shape for m in mentions}]
            if not options:
                return None
            i = int(rng.integers(len(mentions)))
            mentions[i] = dataclasses.replace(mentions[i], shape=options[rng.integers(len(options))])
        else:
            raise ComatError(f"unknown corruption kind '{kind}'; use one of {', '.join(KINDS)}")
        text = PromptSpec(spec.category, tuple(mentions), spec.relation).text
        return None if text == caption else text


# --- corruptions: spaCy parses ------------------------------------------------------------------------------

_OBJECT_DEPS = ("dobj", "pobj", "obj")


def _plural(noun: "Token") -> bool:
    return noun.tag_ in ("NNS", "NNPS")


def _phrase(noun: "Token") -> "Span":
    """The noun with everything before it in its phrase ("a very red car"), not its right-hand dependents."""
    return noun.doc[noun.left_edge.i : noun.i + 1]


def _disjoint(a: "Span", b: "Span") -> bool:
    return a.end <= b.start or b.end <= a.start


def _splice(doc: "Doc", edits: Sequence[tuple["Span", "Span | str"]]) -> str:
    """``doc``'s text with each span replaced by another span's text or a string. A sentence-initial capital stays at
    the start ("A man riding a horse" -> "A horse riding a man")."""
    text = doc.text
    capital = text[:1].isupper() and doc[0].pos_ != "PROPN"
    if capital:
        text = text[0].lower() + text[1:]
    parts, pos = [], 0
    for span, new in sorted(edits, key=lambda e: e[0].start_char):
        parts += [text[pos : span.start_char], new if isinstance(new, str) else text[new.start_char : new.end_char]]
        pos = span.end_char
    out = "".join(parts) + text[pos:]
    return out[:1].upper() + out[1:] if capital else out


class SpacyCorruptions:
    """Corruptions of free-form captions, made on their spaCy parse; the noun vocabulary is the test set's."""

    def __init__(self, captions: Sequence[str], nlp: "Language | None" = None,
                 filtered_nouns: frozenset[str] = FILTERED_NOUNS):
        nlp = nlp if nlp is not None else load_spacy()
        unique = list(dict.fromkeys(captions))
        self.nlp = nlp
        self.filtered = filtered_nouns
        self.docs = dict(zip(unique, nlp.pipe(unique)))
        vocab: dict[bool, set[str]] = {False: set(), True: set()}
        for doc in self.docs.values():
            for noun, _ in self.entities(doc):
                if noun.pos_ == "NOUN":
                    vocab[_plural(noun)].add(noun.text.lower())
        self.vocab = {k: sorted(v) for k, v in vocab.items()}

    def entities(self, doc: "Doc") -> list[tuple["Token", list["Token"]]]:
        """(noun, attribute tokens) of every entity: ``comat.models.parsing.parse_entities``'s rule without the CLIP token
        alignment it adds (a noun used as another noun's modifier is no entity; filtered nouns are dropped)."""
        return [(t, attrs) for t, attrs in noun_entities(doc) if not is_filtered(t, self.filtered)]

    def __call__(self, caption: str, kind: str, rng: np.random.Generator) -> str | None:
        doc = self.docs.get(caption) or self.nlp(caption)
        if kind == "noun":
            return self.noun_replacement(doc, rng)
        make = {"attribute": self.attribute_swaps, "relation": self.relation_swaps}
        if kind not in make:
            raise ComatError(f"unknown corruption kind '{kind}'; use one of {', '.join(KINDS)}")
        options = [t for t in dict.fromkeys(make[kind](doc)) if t != caption]
        return options[rng.integers(len(options))] if options else None

    def attribute_swaps(self, doc: "Doc") -> list[str]:
        entities = self.entities(doc)
        nouns = {t.i for t, _ in entities}
        blocks = []  # (noun, span from its first to its last attribute), when that span holds no noun
        for noun, attrs in entities:
            if attrs:
                span = doc[attrs[0].i : attrs[-1].i + 1]
                if not any(span.start <= i < span.end for i in nouns):
                    blocks.append((noun, span))
        return [_splice(doc, [(sa, sb), (sb, sa)]) for (na, sa), (nb, sb) in combinations(blocks, 2)
                if na.lemma_.lower() != nb.lemma_.lower() and sa.text.lower() != sb.text.lower() and _disjoint(sa, sb)]

    def relations(self, doc: "Doc") -> list[tuple["Token", "Token"]]:
        """(subject, object) noun pairs: an object (``dobj``/``pobj``) reaches its subject through prepositions,
        relation nouns ("on the left of") and verbs (the verb's ``nsubj``, or the noun an ``acl``/``relcl`` verb
        modifies). A preposition on a verb that has another direct object is an adjunct ("holding an umbrella in the
        rain"), not a relation between its object and the subject."""
        nouns = {t.i: t for t, _ in self.entities(doc)}
        found = []
        for obj in nouns.values():
            if obj.dep_ not in _OBJECT_DEPS:
                continue
            node, path, subject = obj.head, [], None
            while subject is None:
                if node.i in nouns:
                    subject = node
                elif node.pos_ in ("VERB", "AUX"):
                    if any(c.dep_ == "dobj" and c.i != obj.i for c in node.children):
                        break
                    path.append(node)
                    subject = next((nouns[c.i] for c in node.children if c.dep_ in ("nsubj", "nsubjpass") and c.i in nouns), None)
                    if subject is None and node.dep_ in ("acl", "relcl"):
                        node = node.head
                        continue
                    break
                elif (node.pos_ in ("ADP", "ADV", "ADJ") or node.text.lower() in RELATION_NOUNS) and node.head.i != node.i:
                    path.append(node)
                    node = node.head
                else:
                    break
            words = f" {' '.join(t.text.lower() for t in sorted(path, key=lambda t: t.i))} "
            if subject is not None and not any(f" {r} " in words for r in SYMMETRIC_RELATIONS):
                found.append((subject, obj))
        return found

    def relation_swaps(self, doc: "Doc") -> list[str]:
        return [_splice(doc, [(a, b), (b, a)]) for s, o in self.relations(doc)
                for a, b in [(_phrase(s), _phrase(o))] if _disjoint(a, b) and a.text.lower() != b.text.lower()]

    def noun_replacement(self, doc: "Doc", rng: np.random.Generator) -> str | None:
        """One noun replaced by a vocabulary noun of the same number that the caption lacks; "a"/"an" follows it."""
        entities = [t for t, _ in self.entities(doc)]
        present = {w for t in entities for w in (t.text.lower(), t.lemma_.lower())}
        options = {t.i: [w for w in self.vocab[_plural(t)] if w not in present]
                   for t in entities if t.pos_ == "NOUN"}  # a name (PROPN) is no vocabulary noun
        nouns = [i for i, words in options.items() if words]
        if not nouns:
            return None
        i = nouns[rng.integers(len(nouns))]
        new = options[i][rng.integers(len(options[i]))]
        edits: list[tuple[Span, Span | str]] = [(doc[i : i + 1], new)]
        if i and doc[i - 1].text.lower() in ("a", "an"):
            article = "an" if new[0] in "aeiou" else "a"
            edits.append((doc[i - 1 : i], article.capitalize() if doc[i - 1].text[0].isupper() else article))
        return _splice(doc, edits)


# --- scoring ------------------------------------------------------------------------------------------------


def sensitivity_score(log_p: float, log_p_corrupted: float) -> float:
    """S of one triple; undefined (nan) when log p(P|I) is exactly 0."""
    return (log_p - log_p_corrupted) / abs(log_p) if log_p != 0 else math.nan


def corruptions(items: Sequence[Item], corrupt: Corrupter, seed: int) -> tuple[list[list[tuple[str, str]]], Counter]:
    """Per item, its (kind, corrupted caption) list; and the number of captions skipped per kind."""
    out, skipped = [], Counter({k: 0 for k in KINDS})
    for index, item in enumerate(items):
        rng = np.random.default_rng([seed, index])
        found = []
        for kind in KINDS:
            text = corrupt(item.caption, kind, rng)
            if text is None:
                skipped[kind] += 1
            else:
                found.append((kind, text))
        out.append(found)
    return out, skipped


@torch.no_grad()
def log_probs(captioner, items: Sequence[Item], texts: Sequence[Sequence[str]], *, prefix: str,
              batch_size: int) -> list[list[float]]:
    """``log p(text | image)`` of every text of every item (summed over caption tokens). A batch holds images of
    one size only, since real images differ in size."""
    from comat.generation.engine import to_tensor

    out: list[list[float]] = [[] for _ in items]
    pending: list[tuple[int, np.ndarray, str]] = []

    def flush() -> None:
        if pending:
            images = to_tensor([a for _, a, _ in pending])
            values = captioner.log_prob(images, [t for _, _, t in pending], prefix=prefix, reduction="sum")
            for (k, _, _), v in zip(pending, values.tolist()):
                out[k].append(v)
            pending.clear()

    for k, item in enumerate(items):
        array = item.array()
        for text in texts[k]:
            if len(pending) == batch_size or (pending and pending[0][1].shape != array.shape):
                flush()
            pending.append((k, array, text))
    flush()
    return out


def measure(captioner, items: Sequence[Item], corrupt: Corrupter, *, seed: int = 0, prefix: str = DEFAULT_PREFIX,
            batch_size: int = 16) -> tuple[list[dict], Counter]:
    """One record per (image, caption, corrupted caption) triple, and the skipped count per kind."""
    found, skipped = corruptions(items, corrupt, seed)
    scores = log_probs(captioner, items, [[it.caption] + [t for _, t in f] for it, f in zip(items, found)],
                       prefix=prefix, batch_size=batch_size)
    records = []
    for item, pairs, (true, *corrupted) in zip(items, found, scores):
        for (kind, text), value in zip(pairs, corrupted):
            records.append({"id": item.id, "category": item.category, "image": item.image, "caption": item.caption,
                            "kind": kind, "corrupted": text, "log_p": true, "log_p_corrupted": value,
                            "score": sensitivity_score(true, value)})
    return records, skipped


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if values else math.nan


def aggregate(records: Sequence[dict], skipped: Counter, n_items: int) -> dict:
    """S per kind and overall (mean over triples); triples whose S is undefined are counted, not averaged."""
    defined = [r for r in records if not math.isnan(r["score"])]
    per_kind = {}
    for kind in KINDS:
        scores = [r["score"] for r in defined if r["kind"] == kind]
        per_kind[kind] = {"S": _mean(scores), "triples": len(scores), "skipped": skipped[kind],
                          "prefers_true": _mean([float(s > 0) for s in scores])}
    return {"S": _mean([r["score"] for r in defined]), "triples": len(defined), "items": n_items,
            "undefined": len(records) - len(defined), "per_kind": per_kind}


def parameter_count(n: int) -> str:
    """469M, 7.2B, 1.3M: the way Table 7 writes sizes."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            value = n / scale
            return f"{value:.0f}{unit}" if value >= 100 else f"{value:.1f}{unit}"
    return str(n)


def table_rows(captioner: str, parameters: int, agg: dict) -> list[dict]:
    """Table 7 shape: the paper's rows, then the measured one with its per-kind scores."""
    rows = [dict.fromkeys(TABLE_COLUMNS) | {"source": "paper Table 7", "captioner": name, "parameters": size, "S": s}
            for name, size, s in PAPER_TABLE7]
    rows.append({"source": "measured", "captioner": captioner, "parameters": parameter_count(parameters), "S": agg["S"],
                 **{f"S {k}": agg["per_kind"][k]["S"] for k in KINDS}, "triples": agg["triples"]})
    return rows


# --- the run ------------------------------------------------------------------------------------------------


def _model_kind(ref: str) -> str:
    from comat.models.hub import resolve_model_path

    config = resolve_model_path(ref) / "config.json"
    model_type = json.loads(config.read_text()).get("model_type") if config.is_file() else None
    if model_type not in KNOWN_KINDS:
        raise ComatError(f"captioner '{ref}' is not a {', '.join(KNOWN_KINDS)} model ({model_type or 'no config.json'}); "
                         "pass --captioner KIND and a checkpoint of that kind")
    return model_type


def resolve_captioner(name: str | None, ref: str | None, real_data: bool) -> tuple[str, str]:
    """(kind, checkpoint) from ``--captioner`` and ``--captioner-model``; see :class:`SensitivityConfig`."""
    if name is None and ref is not None:
        return _model_kind(ref), ref
    name = name or ("blip" if real_data else "toy/blip")
    if name.startswith("toy/"):
        if name not in TOY_CAPTIONERS:
            raise ComatError(f"unknown toy captioner '{name}'; the zoo's captioners are {', '.join(TOY_CAPTIONERS)}")
        if ref is not None:
            raise ComatError(f"--captioner {name} names its checkpoint already; drop --captioner-model, or pass "
                             f"--captioner KIND --captioner-model {ref}")
        return name[4:], name
    if name not in KNOWN_KINDS:
        raise ComatError(f"unknown captioner '{name}'; use a kind ({', '.join(KNOWN_KINDS)}, with --captioner-model "
                         f"REF for its checkpoint) or a toy captioner ({', '.join(TOY_CAPTIONERS)})")
    if ref == "toy":  # as --model toy elsewhere: the toy world's model of that kind
        ref = f"toy/{name}"
    return name, ref or PAPER_CAPTIONERS[name]


@register
class CaptionerSensitivity(Benchmark):
    """The test set's (image, caption) pairs are the samples; :meth:`run` scores every triple with the captioner
    (options ``captioner``, ``captioner_model``; see :func:`resolve_captioner`). No image is generated."""

    name = "sensitivity"
    title = "Captioner sensitivity"

    def __init__(self, protocol, *, data: Path | None = None, unpinned: bool = False):
        super().__init__(protocol, data=data, unpinned=unpinned)
        self.items: dict[str, Item] = {}
        self._skipped: Counter = Counter()
        self._measured: tuple[str, int, int] = ("", 0, 0)  # captioner label, parameters, items

    def samples(self) -> list[Sample]:
        if self.data_dir is not None:
            items = read_pairs(self.data_dir)
        else:
            items = toy_items(int(self.option("n", 300)), self.protocol.seed)
        self.items = {i.id: i for i in items}
        return [Sample(i.id, i.caption, i.category) for i in items]

    def run(self, samples: Sequence[Sample], ctx) -> list[dict]:
        from comat.core.runtime import resolve_device
        from comat.evaluation.data import sha256_of
        from comat.models.captioners import load_captioner
        from comat.models.fingerprint import model_fingerprint

        items = [self.items[s.id] for s in samples]
        seed, prefix = self.protocol.seed, self.option("prefix", DEFAULT_PREFIX)
        kind, ref = resolve_captioner(self.option("captioner", None), self.option("captioner_model", None),
                                      self.data_dir is not None)
        if self.data_dir is not None:
            spacy_model = self.option("spacy_model", "en_core_web_sm")
            corrupt: Corrupter = SpacyCorruptions([i.caption for i in items], load_spacy(spacy_model))
            digest = sha256_of(self.data_dir)
            data = {"path": str(self.data_dir), "sha256": digest, "pairs": len(items), "parser": spacy_model}
            data_line = f"{self.data_dir} (sha256 {digest[:12]}, {len(items)} pairs, spaCy {spacy_model})"
        else:
            corrupt = ToyCorruptions([i.caption for i in items])
            data = {"toy": "renders of toy eval prompts, categories in turn", "scenes": len(items), "seed": seed}
            data_line = f"toy eval prompts, {len(items)} renders, seed {seed}"
        captioner = load_captioner(kind, ref, device=resolve_device(ctx.cfg.device))
        records, self._skipped = measure(captioner, items, corrupt, seed=seed, prefix=prefix,
                                         batch_size=ctx.cfg.batch_size)
        label = ref if ref.startswith("toy/") or ref == PAPER_CAPTIONERS[kind] else f"{kind} ({ref})"
        self._measured = (label, captioner.num_parameters(), len(items))
        self.protocol_extra = {
            "benchmark": "captioner sensitivity (paper Table 7)", "data": data_line, "images_per_prompt": None,
            "seeds": None, "sampler": None, "judges": None, "captioner": label,
            "log_p": f"sum over caption tokens after the prefix {prefix!r}, end token included",
            "S": "(log p(P|I) - log p(P'|I)) / |log p(P|I)|, mean over triples",
            "corruptions": "attribute swap, relation (subject/object) swap, noun replacement", "seed": seed,
        }
        self.manifest_extra = {
            "data": data,
            "captioner": {"kind": kind, "ref": ref, "class": type(captioner.model).__name__,
                          "fingerprint": model_fingerprint(ref), "parameters": self._measured[1]},
            "counts": {"items": len(items), "skipped": dict(self._skipped)},
        }
        return records

    def score(self, samples: Sequence[Sample], images: Sequence[Sequence[Path]], judges) -> list[dict]:
        raise NotImplementedError("captioner sensitivity scores captions of given images, not generated images")

    def aggregate(self, records: Sequence[dict]) -> tuple[dict, list[dict]]:
        label, parameters, n_items = self._measured
        agg = aggregate(records, self._skipped, n_items)
        self.manifest_extra.setdefault("counts", {})["triples"] = agg["triples"]
        self.notes = ["skipped (caption admits no corruption of the kind): "
                      + ", ".join(f"{k} {self._skipped[k]} of {n_items}" for k in KINDS),
                      "share of triples with log p(P|I) > log p(P'|I): "
                      + ", ".join(f"{k} {agg['per_kind'][k]['prefers_true']:.3f}" for k in KINDS)]
        if agg["undefined"]:
            self.notes.append(f"{agg['undefined']} triples have log p(P|I) = 0 exactly: S undefined, left out of "
                              "the means")
        return agg, table_rows(label, parameters, agg)
