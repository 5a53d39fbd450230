"""Quality bars of the toy vision judges, measured against the ground truth of held-out renders.

- ``detector_recall``: share of objects the detector finds with the right label (score >= 0.5, box IoU
  >= 0.5, one detection per object) and, for the two objects of a spatial relation, at the right
  relative position by T2I-CompBench's UniDet rule (each object = the best detection of its label).
- ``segmenter_miou``: mean mask IoU of each noun's mask (the noun as the prompt writes it, plural
  included) against the visible ground-truth mask of the object it names; the segmenter gives a noun
  one mask, so a noun naming several objects is scored against the best-matching one.

Scenes are multi-object scenes of the eval prompt split, drawn round-robin over the categories.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
import torch

from comat.toy.prompts import CATEGORIES, SHAPES, SPATIAL_RELATIONS
from comat.toy.world import RenderedScene, render, sample_scene

MULTI_OBJECT = tuple(c for c in CATEGORIES if c != "single")
Box = tuple[float, float, float, float]


class DetectorLike(Protocol):
    def detect(self, images: Sequence[np.ndarray], labels: Sequence[str]) -> list[list[tuple[str, float, Box]]]: ...


def heldout_scenes(n_scenes: int, seed: int = 0, categories: Sequence[str] = MULTI_OBJECT) -> list[RenderedScene]:
    rng = np.random.default_rng([seed, 0x5CE7E])
    return [render(sample_scene(categories[i % len(categories)], rng, "eval")) for i in range(n_scenes)]


def box_iou(a: Box, b: Box) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def t2i_spatial_holds(kind: str, box1: Box, box2: Box) -> bool:
    """T2I-CompBench's position test for "obj1 <kind> obj2" on box centres (the IoU factor only scales
    the score, so agreement is its sign). "next to" only asks both to be found at the toy scale."""
    dx = (box2[0] + box2[2]) / 2 - (box1[0] + box1[2]) / 2
    dy = (box2[1] + box2[3]) / 2 - (box1[1] + box1[3]) / 2
    if kind == "next to":
        return True
    if kind == "on the left of":
        return dx > 0 and abs(dx) > abs(dy)
    if kind == "on the right of":
        return dx < 0 and abs(dx) > abs(dy)
    if kind == "on the bottom of":
        return dy < 0 and abs(dy) > abs(dx)
    if kind == "on the top of":
        return dy > 0 and abs(dy) > abs(dx)
    raise ValueError(f"not a spatial relation: {kind!r}")


def _match(r: RenderedScene, detections: Sequence[tuple[str, float, Box]], threshold: float) -> list[bool]:
    """Greedy one-to-one matching by IoU, best pairs first, within each label."""
    pairs = sorted(
        ((box_iou(tuple(map(float, gt)), box), i, j)
         for i, (o, gt) in enumerate(zip(r.scene.objects, r.boxes))
         for j, (label, score, box) in enumerate(detections) if label == o.shape and score >= threshold),
        reverse=True,
    )
    found, used = [False] * len(r.boxes), set()
    for iou, i, j in pairs:
        if iou >= 0.5 and not found[i] and j not in used:
            found[i] = True
            used.add(j)
    return found


def _first_box(detections: Sequence[tuple[str, float, Box]], label: str, threshold: float) -> Box | None:
    best = max((d for d in detections if d[0] == label and d[1] >= threshold), key=lambda d: d[1], default=None)
    return None if best is None else best[2]


def detector_recall(detector: DetectorLike, n_scenes: int = 300, seed: int = 0, threshold: float = 0.5) -> float:
    scenes = heldout_scenes(n_scenes, seed)
    detections = detector.detect([r.image for r in scenes], list(SHAPES))
    hits = total = 0
    for r, dets in zip(scenes, detections):
        found = _match(r, dets, threshold)
        rel = r.scene.relation
        if rel is not None and rel.kind in SPATIAL_RELATIONS:
            a, b = r.scene.objects[rel.subject], r.scene.objects[rel.object]
            box1, box2 = _first_box(dets, a.shape, threshold), _first_box(dets, b.shape, threshold)
            if box1 is None or box2 is None or not t2i_spatial_holds(rel.kind, box1, box2):
                found[rel.subject] = found[rel.object] = False
        hits += sum(found)
        total += len(found)
    return hits / max(total, 1)


def mention_nouns(r: RenderedScene) -> list[str]:
    """The head noun of each mention as the prompt writes it ("circles" in "two red circles")."""
    return [m.text.split()[-1] for m in r.scene.spec.mentions]


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def segmenter_miou(segmenter: Callable[[np.ndarray, list[str]], torch.Tensor], n_scenes: int = 100,
                   seed: int = 0) -> float:
    ious = []
    for r in heldout_scenes(n_scenes, seed):
        nouns = mention_nouns(r)
        masks = np.asarray(torch.as_tensor(segmenter(r.image, nouns)).cpu().numpy(), bool)
        for mention, mask in enumerate(masks):
            ious.append(max(mask_iou(mask, r.masks[k]) for k in r.scene.objects_of(mention)))
    return float(np.mean(ious)) if ious else 0.0
