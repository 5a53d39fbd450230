"""T2I-CompBench (Huang et al. 2023): attribute binding, spatial, non-spatial and complex prompts.

Scoring follows the official scripts (BLIPvqa_eval, UniDet_eval/2D_spatial_eval.py, CLIPScore_eval, 3_in_1):

* color / shape / texture: BLIP-VQA. Questions are the spaCy noun chunks of the prompt (minus "top", "the side",
  "the left", "the right"), the first 8 only, each asked as "<chunk>?"; each P(yes) and the running product are
  rounded to 4 decimals as upstream writes them to JSON; a prompt without chunks scores 1.
* spatial: detector rule on the first and last noun, in the 479-px frame UniDet saw.
* non-spatial: CLIP raw cosine of image and prompt.
* complex: 3-in-1 by the upstream split files.

``mode=faithful`` (default) keeps the upstream quirks so numbers compare with published ones; ``mode=fixed``
repairs them: relation phrases matched as whole words with "on top of" scored as "on the top of", the complex
object extraction using the same phrases, nouns lemmatised before matching detector labels, and a zero-area
union giving IoU 0 instead of a crash. Every output names the mode.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from comat.core.errors import ComatError
from comat.evaluation.benchmark import Benchmark, Sample
from comat.evaluation.registry import register
from comat.models.parsing import load_spacy

CATEGORIES = ("color", "shape", "texture", "spatial", "non_spatial", "complex")
BLIP_CATEGORIES = ("color", "shape", "texture")
EXCLUDED_CHUNKS = ("top", "the side", "the left", "the right")
MAX_QUESTIONS = 8
# Upstream's relation list, searched in this order as plain substrings of the prompt.
SPATIAL_VOCAB = ("on side of", "next to", "near", "on the left of", "on the right of", "on the bottom of",
                 "on the top of", "on top of")
# The complex-structure object extraction looks for these (a different list upstream).
COMPLEX_PREPOSITIONS = ("on top of", "on bottom of", "on the left", "on the right", "next to", "on side of", "near")
PERSON = ("girl", "boy", "man", "woman")
DISTANCE_THRESHOLD = 150.0
IOU_THRESHOLD = 0.1
MODES = ("faithful", "fixed")


def round4(x: float) -> float:
    """Upstream stores probabilities as '%.4f' strings and multiplies the parsed values."""
    return float("%.4f" % x)


def noun_phrase_questions(doc) -> list[str]:
    chunks = [c.text for c in doc.noun_chunks if c.text not in EXCLUDED_CHUNKS]
    return [f"{c}?" for c in chunks[:MAX_QUESTIONS]]


def blip_vqa_score(yes_probabilities: Sequence[float]) -> float:
    score = 1.0
    for p in yes_probabilities:
        score = round4(score * round4(p))
    return score


def find_relation(prompt: str, mode: str) -> str | None:
    if mode == "faithful":  # case-sensitive substring search: "linear" finds "near"
        return next((w for w in SPATIAL_VOCAB if w in prompt), None)
    for w in SPATIAL_VOCAB:
        if re.search(rf"\b{re.escape(w)}\b", prompt, flags=re.IGNORECASE):
            return {"on top of": "on the top of"}.get(w, w)
    return None


def _noun(tok, mode: str) -> str:
    word = tok.lemma_.lower() if mode == "fixed" else tok.text
    return "person" if word in PERSON else word


def simple_objects(doc, mode: str) -> tuple[str | None, str | None]:
    nouns = [t for t in doc if t.pos_ == "NOUN"]
    if not nouns:  # upstream raises IndexError here; no objects means no detection score
        return None, None
    return _noun(nouns[0], mode), _noun(nouns[-1], mode)


def complex_objects(doc, mode: str) -> tuple[str | None, str | None]:
    """The nouns around the relation phrase (upstream's complex-structure extraction)."""
    if mode == "fixed":
        relation = find_relation(doc.text, mode)
        words = [t.text.lower() for t in doc]
        phrase = relation.split() if relation else []
        starts = [i for i in range(len(words)) if phrase and words[i : i + len(phrase)] == phrase]
        if not starts:
            return None, None
        i, k = starts[0], len(phrase)
        before = next((t for t in reversed(doc[:i]) if t.pos_ in ("NOUN", "PROPN")), None)
        after = next((t for t in doc[i + k :] if t.pos_ in ("NOUN", "PROPN")), None)
        return (_noun(before, mode), _noun(after, mode)) if before is not None and after is not None else (None, None)
    objects: list[str] = []
    for i in range(len(doc)):
        k = next((n for n in (3, 2, 1) if doc[i : i + n].text in COMPLEX_PREPOSITIONS), None)
        if k is None:
            continue
        for j in range(i - 1, -1, -1):
            if doc[j].pos_ in ("NOUN", "PROPN"):
                objects.append(doc[j].text)
                break
        found = next((doc[j].text for j in range(i + k, len(doc)) if doc[j].pos_ == "NOUN"), None)
        if found is None:  # no noun after the phrase: a proper noun that ends a run of proper nouns
            found = next((doc[j].text for j in range(i + k, len(doc) - 1)
                          if doc[j].pos_ == "PROPN" and doc[j + 1].pos_ != "PROPN"), None)
        if found is not None:
            objects.append(found)
    if len(objects) != 2:
        return None, None
    return tuple("person" if o in PERSON else o for o in objects)  # type: ignore[return-value]


def position_score(relation: str | None, box1: Sequence[float], box2: Sequence[float], mode: str) -> float:
    """Upstream ``determine_position``: boxes (x0, y0, x1, y1) in the 479-px frame, object 1 then object 2."""
    c1 = ((box1[0] + box1[2]) / 2, (box1[1] + box1[3]) / 2)
    c2 = ((box2[0] + box2[2]) / 2, (box2[1] + box2[3]) / 2)
    dx, dy = c2[0] - c1[0], c2[1] - c1[1]
    inter = max(0.0, min(box1[2], box2[2]) - max(box1[0], box2[0])) * max(0.0, min(box1[3], box2[3]) - max(box1[1], box2[1]))
    union = (box1[2] - box1[0]) * (box1[3] - box1[1]) + (box2[2] - box2[0]) * (box2[3] - box2[1]) - inter
    if union <= 0:
        if mode == "faithful":
            raise ZeroDivisionError("zero-area boxes: upstream divides by zero here")
        iou = 0.0
    else:
        iou = inter / union
    overlap = 1.0 if iou < IOU_THRESHOLD else IOU_THRESHOLD / iou
    if relation in ("next to", "on side of", "near"):
        if abs(dx) < DISTANCE_THRESHOLD or abs(dy) < DISTANCE_THRESHOLD:
            return 1.0
        return DISTANCE_THRESHOLD / max(abs(dx), abs(dy))
    if relation == "on the right of":
        return overlap if dx < 0 and abs(dx) > abs(dy) else 0.0
    if relation == "on the left of":
        return overlap if dx > 0 and abs(dx) > abs(dy) else 0.0
    if relation == "on the bottom of":
        return overlap if dy < 0 and abs(dy) > abs(dx) else 0.0
    if relation == "on the top of":
        return overlap if dy > 0 and abs(dy) > abs(dx) else 0.0
    return 0.0  # no relation found, or upstream's "on top of", which has no branch


def spatial_score(obj1: str | None, obj2: str | None, relation: str | None, detections: Sequence,
                  scale: float, mode: str) -> tuple[float, bool]:
    """Image score: 0.25 * each found object's confidence + 0.5 * position; below 0.5 counts as 0.

    ``detections`` are [label, score, box] best first; each object takes the first detection with its label.
    ``scale`` maps the image's pixels to the 479-px frame. Also says whether the boxes were degenerate, where
    upstream crashes (faithful mode scores the position 0 and the run notes how often)."""
    labels = [d[0] for d in detections]
    degenerate = False
    first = {lab: detections[labels.index(lab)] for lab in (obj1, obj2) if lab is not None and lab in labels}
    if obj1 in first and obj2 in first:
        (_, s1, b1), (_, s2, b2) = first[obj1], first[obj2]
        try:
            pos = position_score(relation, [v * scale for v in b1], [v * scale for v in b2], mode)
        except ZeroDivisionError:
            pos, degenerate = 0.0, True
        score = 0.25 * s1 + 0.25 * s2 + pos / 2
    elif obj1 in first:
        score = 0.25 * first[obj1][1]
    elif obj2 in first:
        score = 0.25 * first[obj2][1]
    else:
        score = 0.0
    return (0.0 if score < 0.5 else score), degenerate


def three_in_one(split: str, blip: float, detector: float, clip: float) -> float:
    if split == "spatial":
        return (blip + detector) / 2
    if split == "action":
        return (blip + clip) / 2
    return (blip + detector + clip) / 3


@register
class T2ICompBench(Benchmark):
    name = "t2i-compbench"

    def __init__(self, protocol, **kwargs):
        super().__init__(protocol, **kwargs)
        self.mode = str(protocol.options.get("mode", "faithful"))
        if self.mode not in MODES:
            raise ComatError(f"t2i-compbench option mode={self.mode!r} is unknown; use mode=faithful or mode=fixed")
        self.frame = float(protocol.options.get("spatial_frame", 479))
        self._nlp = None

    @property
    def nlp(self):
        if self._nlp is None:
            self._nlp = load_spacy("en_core_web_sm")
        return self._nlp

    def _lines(self, name: str) -> list[str]:
        path = self.fetch(name).path
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise ComatError(f"{path}: not UTF-8 text; expected one prompt per line") from None
        return [line.strip() for line in lines if line.strip()]

    def samples(self) -> list[Sample]:
        if self.toy:
            return self._toy_samples()
        spatial = set(self._lines("complex_val_spatial.txt"))
        action = set(self._lines("complex_val_action.txt"))
        out = []
        for cat in CATEGORIES:
            for i, prompt in enumerate(self._lines(f"{cat}_val.txt")):
                split = "spatial" if prompt in spatial else "action" if prompt in action else "other"
                out.append(Sample(f"{cat}_{i:06d}", prompt, cat, {"split": split} if cat == "complex" else {}))
        return self._drop_train_overlap(out, {cat: set(self._lines(f"{cat}_train.txt")) for cat in CATEGORIES})

    def _toy_samples(self) -> list[Sample]:
        from comat.toy.prompts import NON_SPATIAL_RELATIONS, prompt_specs, prompts

        out = []
        for cat in CATEGORIES:
            for i, spec in enumerate(prompt_specs(cat, "eval")):
                meta = {"unseen": spec.is_unseen()}
                if cat == "complex":  # the toy's analogue of the split files: the relation's kind
                    meta["split"] = "action" if spec.relation[0] in NON_SPATIAL_RELATIONS else "spatial"
                out.append(Sample(f"{cat}_{i:06d}", spec.text, cat, meta))
        return self._drop_train_overlap(out, {cat: set(prompts(cat, "train")) for cat in CATEGORIES})

    def _drop_train_overlap(self, samples: list[Sample], train: dict[str, set[str]]) -> list[Sample]:
        """Report (and with ``exclude_train_overlap`` remove) evaluation prompts found verbatim in training prompts."""
        self.overlap = {cat: sum(s.prompt in train[cat] for s in samples if s.category == cat) for cat in CATEGORIES}
        excluded = bool(self.protocol.options.get("exclude_train_overlap", False))
        self.notes.append("evaluation prompts also in the training prompts: "
                          + ", ".join(f"{c} {n}" for c, n in self.overlap.items())
                          + (" (excluded)" if excluded else " (kept; exclude_train_overlap=true removes them)"))
        return [s for s in samples if not (excluded and s.prompt in train[s.category])]

    # -- scoring ---------------------------------------------------------------------------------------

    def score(self, samples: Sequence[Sample], images: Sequence[Sequence[Path]], judges) -> list[dict]:
        pairs = [(s, p, seed) for s, paths in zip(samples, images) for p, seed in zip(paths, self.protocol.seeds())]
        docs = {s.prompt: self.nlp(s.prompt) for s in samples}
        records = [{"id": s.id, "category": s.category, "prompt": s.prompt, "seed": seed, "image": str(p),
                    **s.meta} for s, p, seed in pairs]

        blip_rows = [i for i, (s, _, _) in enumerate(pairs) if s.category in BLIP_CATEGORIES + ("complex",)]
        questions = {i: noun_phrase_questions(docs[pairs[i][0].prompt]) for i in blip_rows}
        flat = [(i, q) for i in blip_rows for q in questions[i]]
        probs = judges.yes_probability([pairs[i][1] for i, _ in flat], [q for _, q in flat])
        for i in blip_rows:
            records[i]["questions"] = questions[i]
            records[i]["yes_probabilities"] = []
        for (i, _), p in zip(flat, probs):
            records[i]["yes_probabilities"].append(round4(p))
        for i in blip_rows:
            records[i]["blip_vqa"] = blip_vqa_score(records[i]["yes_probabilities"])

        self._score_spatial([i for i, (s, _, _) in enumerate(pairs) if s.category in ("spatial", "complex")],
                            pairs, docs, records, judges)
        clip_rows = [i for i, (s, _, _) in enumerate(pairs) if s.category in ("non_spatial", "complex")]
        for i, c in zip(clip_rows, judges.clip_similarity([pairs[i][1] for i in clip_rows],
                                                          [pairs[i][0].prompt for i in clip_rows])):
            records[i]["clip"] = c

        key = {"color": "blip_vqa", "shape": "blip_vqa", "texture": "blip_vqa", "spatial": "spatial",
               "non_spatial": "clip"}
        for r in records:
            r["score"] = (three_in_one(r["split"], r["blip_vqa"], r["spatial"], r["clip"])
                          if r["category"] == "complex" else r[key[r["category"]]])
        return records

    def _score_spatial(self, rows: list[int], pairs, docs, records, judges) -> None:
        import PIL.Image

        crashed = 0
        by_labels: dict[tuple[str, ...], list[int]] = {}
        for i in rows:
            s = pairs[i][0]
            extract = complex_objects if s.category == "complex" else simple_objects
            obj1, obj2 = extract(docs[s.prompt], self.mode)
            relation = find_relation(s.prompt, self.mode)
            records[i].update(objects=[obj1, obj2], relation=relation)
            labels = tuple(dict.fromkeys(o for o in (obj1, obj2) if o))
            by_labels.setdefault(labels, []).append(i)
        for labels, idx in by_labels.items():
            found = judges.detect([pairs[i][1] for i in idx], list(labels)) if labels else [[] for _ in idx]
            for i, dets in zip(idx, found):
                with PIL.Image.open(pairs[i][1]) as im:  # the header only: the judge already decoded the pixels
                    width = im.width
                obj1, obj2 = records[i]["objects"]
                records[i]["detections"] = dets
                records[i]["spatial"], degenerate = spatial_score(obj1, obj2, records[i]["relation"], dets,
                                                                  self.frame / width, self.mode)
                crashed += degenerate
        if crashed:
            self.notes.append(f"{crashed} images had zero-area boxes, where upstream divides by zero (scored 0)")

    def aggregate(self, records: Sequence[dict]) -> tuple[dict, list[dict]]:
        scores, rows = {}, []
        for cat in CATEGORIES:
            group = [r["score"] for r in records if r["category"] == cat]
            if not group:
                continue
            scores[cat] = sum(group) / len(group)
            row = {"category": cat, "score": scores[cat], "images": len(group),
                   "prompts": len({r["id"] for r in records if r["category"] == cat})}
            if self.toy:
                for half, flag in (("seen", False), ("unseen", True)):
                    part = [r["score"] for r in records if r["category"] == cat and r.get("unseen") == flag]
                    row[half] = sum(part) / len(part) if part else None
            rows.append(row)
        return {"scores": scores, "mode": self.mode, "train_overlap": self.overlap}, rows
