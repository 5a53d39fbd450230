"""Object detector judge with labelled, scored boxes (T2I-CompBench's spatial rule uses UniDet).

The detector is an open-vocabulary GroundingDINO: ``detect`` queries the given labels as one
GroundingDINO caption ("circle . square .") and gives every box the label whose phrase it scores
highest. The toy zoo's GroundingDINO serves here and as the first stage of the toy Grounded-SAM.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import PIL.Image
import torch

from comat.core.errors import ComatError
from comat.judges.base import Judge
from comat.models.hub import resolve_model_path
from comat.models.segmenter import detection_query, to_uint8_hwc

Detection = tuple[str, float, tuple[float, float, float, float]]


def phrase_scores(logits: torch.Tensor, input_ids: torch.Tensor, n_phrases: int) -> torch.Tensor:
    """``[Q, n_phrases]`` probabilities: per query, the mean sigmoid over each phrase's tokens (the
    normalisation GroundingDINO's matcher trains with). ``logits`` ``[Q, T]``, ``input_ids`` ``[T']``."""
    from transformers.models.grounding_dino.modeling_grounding_dino import build_label_maps

    label_map = build_label_maps(logits[None], input_ids[None])[0].to(logits.dtype)  # [phrases, T]
    if label_map.shape[0] != n_phrases:
        raise ComatError(
            f"the detector query splits into {label_map.shape[0]} phrases for {n_phrases} labels; "
            "labels must not contain '.' or '?'"
        )
    return logits.sigmoid() @ label_map.T / label_map.sum(1)


def _nms(boxes: torch.Tensor, scores: torch.Tensor, iou: float) -> list[int]:
    from torchvision.ops import nms

    return nms(boxes.float(), scores.float(), iou).tolist()


def detections_from_outputs(
    logits: torch.Tensor,
    pred_boxes: torch.Tensor,
    input_ids: torch.Tensor,
    labels: Sequence[str],
    image_size: tuple[int, int],
    threshold: float = 0.5,
    nms_iou: float = 0.5,
) -> list[Detection]:
    """One image's detections, best first: (label, score, (x0, y0, x1, y1) in pixels).

    ``logits`` ``[Q, T]`` and ``pred_boxes`` ``[Q, 4]`` (normalised cx, cy, w, h) are GroundingDINO's
    outputs for the caption of ``labels``. Each query takes its best label; queries below
    ``threshold`` go; of overlapping boxes with one label (IoU > ``nms_iou``) the best stays, since a
    small set-prediction model sometimes spends two queries on one object.
    """
    h, w = image_size
    probs = phrase_scores(logits.float(), input_ids, len(labels))
    score, label = probs.max(1)
    cx, cy, bw, bh = pred_boxes.float().unbind(-1)
    boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1)
    boxes = (boxes * torch.tensor([w, h, w, h], dtype=boxes.dtype)).clamp(min=0)
    boxes = torch.minimum(boxes, torch.tensor([w, h, w, h], dtype=boxes.dtype))
    keep = torch.nonzero(score >= threshold).flatten()
    kept = []
    for k in label[keep].unique().tolist():
        idx = keep[label[keep] == k]
        kept += idx[_nms(boxes[idx], score[idx], nms_iou)].tolist()
    kept.sort(key=lambda i: -score[i].item())
    return [(labels[label[i]], float(score[i]), tuple(float(v) for v in boxes[i])) for i in kept]


class Detector(Judge):
    """Labelled boxes with confidences for a list of label words (stand-in interface for UniDet)."""

    def __init__(self, model: torch.nn.Module, processor, *, threshold: float = 0.5, nms_iou: float = 0.5,
                 device: str | torch.device = "cpu", batch_size: int = 32):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.processor = processor
        self.threshold = threshold
        self.nms_iou = nms_iou
        self.batch_size = batch_size

    @classmethod
    def load(cls, ref: str | os.PathLike, **kwargs) -> "Detector":
        """GroundingDINO from a hub id, a ``save_pretrained`` directory, or ``toy`` (= ``toy/grounding_dino``)."""
        from transformers import AutoProcessor, GroundingDinoForObjectDetection

        ref = "toy/grounding_dino" if str(ref) == "toy" else ref
        path = resolve_model_path(ref)
        if not (path / "config.json").is_file():
            raise ComatError(
                f"detector directory '{path}' has no config.json; pass a GroundingDINO save_pretrained directory"
            )
        model = GroundingDinoForObjectDetection.from_pretrained(path, dtype=torch.float32, use_safetensors=True)
        return cls(model, AutoProcessor.from_pretrained(path), **kwargs)

    @torch.no_grad()
    def detect(
        self, images: Sequence[torch.Tensor | PIL.Image.Image | np.ndarray], labels: Sequence[str]
    ) -> list[list[Detection]]:
        """Per image, its detections of ``labels`` (best first): ``(label, score, (x0, y0, x1, y1) pixels)``.

        Images: ``[3, H, W]`` tensors in [0, 1] or uint8, PIL images or HxWx3 uint8 arrays. Repeated
        labels are queried once.
        """
        labels = list(dict.fromkeys(labels))
        if not labels:
            return [[] for _ in images]
        query = detection_query(labels)
        results: list[list[Detection]] = []
        for start in range(0, len(images), self.batch_size):
            chunk = [to_uint8_hwc(im) for im in images[start : start + self.batch_size]]
            inputs = self.processor(images=[PIL.Image.fromarray(im) for im in chunk], text=[query] * len(chunk),
                                    return_tensors="pt").to(self.device)
            out = self.model(**inputs)
            for i, im in enumerate(chunk):
                results.append(detections_from_outputs(
                    out.logits[i].cpu(), out.pred_boxes[i].cpu(), inputs["input_ids"][i].cpu(), labels, im.shape[:2],
                    self.threshold, self.nms_iou,
                ))
        return results
