"""Recipes of the toy zoo's vision judges: GroundingDINO (the open-vocabulary detector) and a small SAM.

Together they are the toy Grounded-SAM, loaded through the same ``load_segmenter(detector, sam,
sam_type="custom")`` as the real one; GroundingDINO alone is also the toy stand-in for UniDet
(``comat.judges.detector.Detector``). Both train on ground-truth boxes and masks of rendered scenes.

GroundingDINO hard-codes BERT's ids of ``[CLS]``, ``[SEP]``, ``.`` and ``?`` (101, 102, 1012, 1029) to
split a query into phrases, so the toy word vocabulary keeps those ids (:func:`detector_tokenizer`).
"""

from __future__ import annotations

import copy
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import (
    BertConfig,
    BertTokenizer,
    GroundingDinoConfig,
    GroundingDinoForObjectDetection,
    GroundingDinoImageProcessor,
    GroundingDinoProcessor,
    SwinConfig,
)

from comat.models.segmenter import build_custom_sam, detection_query, save_sam
from comat.toy.pretrain import export_fp16
from comat.toy.prompts import SHAPES
from comat.toy.world import SIZE, RenderedScene, sample_batch

PLURALS = {s: s + ("es" if s.endswith("s") else "s") for s in SHAPES}
# Ids GroundingDINO treats as phrase delimiters or padding (transformers' SPECIAL_TOKENS, plus [PAD] = 0).
_BERT_IDS = {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]", 1012: ".", 1029: "?"}
DETECTOR_WORDS = tuple(SHAPES) + tuple(PLURALS.values())
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TEXT_LEN = 32
# Occlusion ("non_spatial") and three-object scenes are the detector's hard cases (pilot recall 0.41 and
# 0.73 where colour scenes were at 0.97); single objects are the easy ones, and each remaining scene
# holds them too.
TRAIN_CATEGORIES = ("color", "shape", "texture", "spatial", "non_spatial", "non_spatial", "complex", "complex",
                    "counting")


def detector_vocabulary(words: Sequence[str] = DETECTOR_WORDS) -> list[str]:
    """BERT-compatible id layout: specials at BERT's ids, ``words`` from 104, ``[unusedN]`` fillers."""
    words = [w for w in dict.fromkeys(w.lower() for w in words) if w not in _BERT_IDS.values()]
    if len(words) > 1012 - 104:
        raise ValueError(f"{len(words)} words do not fit between BERT's special ids")
    vocab = [_BERT_IDS.get(i, f"[unused{i}]") for i in range(1030)]
    for i, word in enumerate(words):
        vocab[104 + i] = word
    return vocab


def detector_tokenizer(words: Sequence[str] = DETECTOR_WORDS) -> BertTokenizer:
    with tempfile.TemporaryDirectory() as d:  # BertTokenizer reads the file once; save_pretrained rewrites it
        path = Path(d) / "vocab.txt"
        path.write_text("\n".join(detector_vocabulary(words)) + "\n")
        return BertTokenizer(str(path), do_lower_case=True)


def detector_processor(tokenizer: BertTokenizer | None = None) -> GroundingDinoProcessor:
    image_processor = GroundingDinoImageProcessor(
        size={"shortest_edge": SIZE, "longest_edge": SIZE}, image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
    )
    return GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer or detector_tokenizer())


def imagenet_normalize(images: torch.Tensor) -> torch.Tensor:
    """What the processor does to a SIZE x SIZE image in [0, 1] (no resize needed), done batched for training."""
    return (images - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def grounding_dino_config(vocab_size: int) -> GroundingDinoConfig:
    return GroundingDinoConfig(
        # Patch 2 keeps the finest level at 16x16 (stride 4): small shapes are 12 px across.
        backbone_config=SwinConfig(
            image_size=SIZE, patch_size=2, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 4], window_size=4,
            out_features=["stage2", "stage3", "stage4"],
        ),
        text_config=BertConfig(
            vocab_size=vocab_size, hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128,
            max_position_embeddings=TEXT_LEN,
        ),
        d_model=64, num_queries=12, encoder_layers=2, decoder_layers=3, encoder_ffn_dim=128, decoder_ffn_dim=128,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_n_points=2, decoder_n_points=2,
        max_text_len=TEXT_LEN, auxiliary_loss=True, dropout=0.0, fusion_droppath=0.0,
        # 0.25 (DINO's) keeps true objects' scores low for longer; the judges cut at 0.5 (UniDet's
        # confidence) and 0.3 (Grounded-SAM's box threshold). Pilot at step 3k: recall@0.5 0.72 vs 0.64.
        focal_alpha=0.5,
    )


def detection_targets(
    r: RenderedScene, rng: np.random.Generator, p_query: float = 0.6, p_plural: float = 0.3
) -> tuple[str, dict[str, torch.Tensor]]:
    """A random query (a non-empty random subset of the shape nouns in random order, some plural) and
    GroundingDINO's labels for it: phrase index + normalised cxcywh box of every object the query names.

    Querying nouns that are absent, and leaving out nouns that are present, teaches the detector to
    ground on the text rather than to find every object.
    """
    query = [s for s in SHAPES if rng.random() < p_query] or [SHAPES[rng.integers(len(SHAPES))]]
    query = [query[i] for i in rng.permutation(len(query))]
    text = detection_query([PLURALS[s] if rng.random() < p_plural else s for s in query])
    classes, boxes = [], []
    for o, (x0, y0, x1, y1) in zip(r.scene.objects, r.boxes):
        if o.shape in query:
            classes.append(query.index(o.shape))
            boxes.append([(x0 + x1) / 2 / SIZE, (y0 + y1) / 2 / SIZE, (x1 - x0) / SIZE, (y1 - y0) / SIZE])
    return text, {"class_labels": torch.tensor(classes, dtype=torch.long),
                  "boxes": torch.tensor(boxes, dtype=torch.float32).view(-1, 4)}


def _criterion(config: GroundingDinoConfig, losses: tuple[str, ...] = ("labels", "boxes", "cardinality")):
    from transformers.loss.loss_grounding_dino import GroundingDinoHungarianMatcher, GroundingDinoImageLoss

    class PhraseTargetsFixed(GroundingDinoImageLoss):
        """transformers 5.23 offsets image i's phrase ids by image i's own phrase count instead of the count
        of all earlier images, so from the third image of a batch on the targets name another image's
        phrases: only objectness can be learned, never which noun. Same loss, right offsets."""

        def _get_target_classes_one_hot(self, outputs, targets, indices):
            logits, maps = outputs["logits"], outputs["label_maps"]
            offsets = np.cumsum([0] + [len(m) for m in maps[:-1]])
            class_labels = torch.cat([t["class_labels"][j] + int(off)
                                      for t, (_, j), off in zip(targets, indices, offsets)])
            onehot = torch.zeros_like(logits, dtype=torch.long)
            onehot[self._get_source_permutation_idx(indices)] = torch.cat(maps, 0)[class_labels].to(torch.long)
            return onehot

    matcher = GroundingDinoHungarianMatcher(class_cost=config.class_cost, bbox_cost=config.bbox_cost,
                                            giou_cost=config.giou_cost)
    return PhraseTargetsFixed(matcher=matcher, focal_alpha=config.focal_alpha, losses=list(losses))


def _weighted(losses: dict[str, torch.Tensor], config: GroundingDinoConfig) -> torch.Tensor:
    """transformers' weighting; "loss_ce_1" is decoder layer 1's "loss_ce", cardinality only logs."""
    weights = {"loss_ce": 2.0, "loss_bbox": config.bbox_loss_coefficient, "loss_giou": config.giou_loss_coefficient}

    def base(key: str) -> str:
        return key.rsplit("_", 1)[0] if key[-1].isdigit() else key

    return sum(v * weights[base(k)] for k, v in losses.items() if base(k) in weights)


def grounding_dino_loss(logits, labels, device, pred_boxes, config, label_maps, text_mask, outputs_class=None,
                        outputs_coord=None, encoder_logits=None, encoder_pred_boxes=None, **kwargs):
    """transformers' ``GroundingDinoForObjectDetectionLoss`` (set as the model's ``loss_function``) with the
    phrase targets fixed, and without its two-stage term: that one scores the picked proposals after
    ``detach()``, so it trains nothing; :func:`encoder_proposal_loss` replaces it."""
    from transformers.loss.loss_for_object_detection import _set_aux_loss

    outputs = {"logits": logits, "pred_boxes": pred_boxes, "label_maps": label_maps, "text_mask": text_mask}
    auxiliary = None
    if config.auxiliary_loss:
        auxiliary = _set_aux_loss(outputs_class, outputs_coord)
        for aux in auxiliary:
            aux.update(label_maps=label_maps, text_mask=text_mask)
        outputs["auxiliary_outputs"] = auxiliary
    losses = _criterion(config)(outputs, labels)
    return _weighted(losses, config), losses, auxiliary


def encoder_proposal_loss(out, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: list[dict],
                          config: GroundingDinoConfig) -> torch.Tensor:
    """The same set loss on the dense encoder proposals, from which the two-stage decoder picks its
    top-k queries (the original DINO trains them on all tokens; from scratch, untrained proposals leave
    the decoder starting from random boxes)."""
    from transformers.models.grounding_dino.modeling_grounding_dino import build_label_maps, build_text_mask

    outputs = {
        "logits": out.enc_outputs_class, "pred_boxes": out.enc_outputs_coord_logits.sigmoid(),
        "label_maps": build_label_maps(out.logits, input_ids),
        "text_mask": build_text_mask(out.enc_outputs_class, attention_mask),
    }
    return _weighted(_criterion(config, ("labels", "boxes"))(outputs, labels), config)


def freeze_text_path(model: GroundingDinoForObjectDetection, word_std: float = 1.0) -> None:
    """Fix the text features at distinct random vectors: BERT (word embeddings widened so that word
    identity dominates position and type), its projection, the text enhancer layers, and the image-to-text
    half of every fusion layer (its gate set to 0).

    Trained from scratch, the text side collapses within a few hundred steps to one "object" vector
    (cosine 0.99+ between all nouns, measured): the cheapest way to lower the focal loss while the image
    side cannot yet tell shapes apart, and a saddle that never lets the nouns apart again. Real
    GroundingDINO starts from a pretrained BERT and tunes it at lr 1e-5; fixed distinct features are the
    toy's pretrained BERT, and the image side learns to point at them.
    """
    inner = model.model
    with torch.no_grad():
        inner.text_backbone.embeddings.word_embeddings.weight.normal_(0.0, word_std)
    frozen = [inner.text_backbone, inner.text_projection]
    for layer in inner.encoder.layers:
        fusion = layer.fusion_layer
        with torch.no_grad():
            fusion.text_param.zero_()
        fusion.text_param.requires_grad_(False)
        frozen += [layer.text_enhancer_layer, fusion.layer_norm_text, fusion.attn.values_text_proj,
                   fusion.attn.out_text_proj]
    for module in frozen:
        module.requires_grad_(False)


class GroundingDinoRecipe:
    """GroundingDINO from scratch with its own loss (Hungarian matching; focal, L1 and GIoU terms on every
    decoder layer), two fixes to it (:func:`grounding_dino_loss`) and the same loss on the dense encoder
    proposals (:func:`encoder_proposal_loss`)."""

    # ~0.33 s/step on one thread. Pilot (detector_recall at confidence 0.5 / 0.3): step 1.5k 0.31/0.71,
    # 2.5k 0.52/0.79, 3.0k 0.72/0.90, 3.7k 0.80/0.92, 4.4k 0.87/0.96, 5.0k 0.89/0.97: 0.95 at 0.5 needs
    # about 8k steps (~45 min of one thread).
    name, requires, steps, lr, ema, batch = "grounding_dino", (), 11000, 3e-4, 0.999, 16

    def __init__(self) -> None:
        self.tokenizer = detector_tokenizer()

    def build(self, zoo: Path) -> dict[str, torch.nn.Module]:
        model = GroundingDinoForObjectDetection(grounding_dino_config(len(self.tokenizer)))
        model.loss_function = grounding_dino_loss
        freeze_text_path(model)
        return {"detector": model}

    def loss(self, modules, rng):
        images, _, rendered = sample_batch(self.batch, rng, TRAIN_CATEGORIES)
        texts, labels = zip(*(detection_targets(r, rng) for r in rendered))
        tokens = self.tokenizer(list(texts), padding="longest", return_tensors="pt")
        model = modules["detector"]
        out = model(pixel_values=imagenet_normalize(images), labels=list(labels), **tokens)
        encoder = encoder_proposal_loss(out, tokens["input_ids"], tokens["attention_mask"], list(labels), model.config)
        logs = {k: v.item() for k, v in out.loss_dict.items() if k in ("loss_ce", "loss_bbox", "loss_giou")}
        return out.loss + encoder, {**logs, "loss_encoder": encoder.item()}

    def export(self, modules, zoo: Path) -> None:
        out = zoo / self.name
        export_fp16(modules["detector"], out)
        # Stored in float16 for size; declaring float32 makes from_pretrained's default ("auto") dtype
        # build the float32 model the processor's float32 pixels need (load_segmenter passes no dtype).
        config_path = out / "config.json"
        config = json.loads(config_path.read_text())
        config["dtype"] = "float32"
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        detector_processor(self.tokenizer).save_pretrained(out)


SAM_CONFIG: dict = {
    # 64 px input, 4 px patches: a 16x16 embedding whose 4x-upscaled low-res masks are already full resolution.
    "img_size": SIZE, "patch_size": 4, "embed_dim": 48, "depth": 3, "num_heads": 2, "out_chans": 32,
    "window_size": 4, "global_attn_indexes": [2], "mask_in_chans": 4, "decoder_depth": 2, "decoder_mlp_dim": 128,
    "decoder_num_heads": 2, "iou_head_hidden_dim": 32,
}


def sam_mask_loss(sam: torch.nn.Module, images: torch.Tensor, rendered: list[RenderedScene], rng: np.random.Generator,
                  jitter: float = 1.5) -> tuple[torch.Tensor, float]:
    """BCE + dice of box-prompted masks against the visible ground-truth masks, plus SAM's IoU-head
    regression; returns (loss, mean hard-mask IoU). Boxes are jittered because at run time they come
    from GroundingDINO, not from the ground truth."""
    emb = sam.image_encoder(sam.preprocess(images * 255))
    pe = sam.prompt_encoder.get_dense_pe()
    losses, ious = [], []
    for i, r in enumerate(rendered):
        boxes = torch.tensor(r.boxes, dtype=torch.float32)
        boxes = boxes + torch.from_numpy(rng.uniform(-jitter, jitter, boxes.shape)).float()
        gt = torch.from_numpy(np.stack(r.masks)).float()
        sparse, dense = sam.prompt_encoder(points=None, boxes=boxes, masks=None)
        # SAM's decoder repeats one image embedding over the prompts, so it runs once per image.
        low_res, iou_pred = sam.mask_decoder(
            image_embeddings=emb[i : i + 1], image_pe=pe, sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense, multimask_output=False,
        )
        logits = low_res[:, 0]
        prob = logits.sigmoid()
        dice = 1 - (2 * (prob * gt).sum((1, 2)) + 1) / (prob.sum((1, 2)) + gt.sum((1, 2)) + 1)
        hard, truth = logits > 0, gt > 0
        iou = (hard & truth).sum((1, 2)).float() / (hard | truth).sum((1, 2)).clamp(min=1).float()
        losses.append(F.binary_cross_entropy_with_logits(logits, gt) + dice.mean() + F.mse_loss(iou_pred[:, 0], iou))
        ious.append(iou)
    return torch.stack(losses).mean(), torch.cat(ious).mean().item()


class SamRecipe:
    """A small ``segment_anything`` SAM trained end to end on box prompts (low-res masks = image size)."""

    name, requires, steps, lr, ema, batch = "sam", (), 3000, 1e-3, 0.0, 16

    def build(self, zoo: Path) -> dict[str, torch.nn.Module]:
        return {"sam": build_custom_sam(SAM_CONFIG).train()}

    def loss(self, modules, rng):
        images, _, rendered = sample_batch(self.batch, rng)
        loss, miou = sam_mask_loss(modules["sam"], images, rendered, rng)
        return loss, {"miou": miou}

    def export(self, modules, zoo: Path) -> None:
        # load_sam builds the model in float32 and load_state_dict casts, so float16 storage is transparent.
        save_sam(copy.deepcopy(modules["sam"]).half(), zoo / self.name, SAM_CONFIG)


VISION_RECIPES = {r.name: r for r in (GroundingDinoRecipe, SamRecipe)}
