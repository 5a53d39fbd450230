"""Toy vision judges: GroundingDINO + SAM recipes, their export into the real loaders, the detector
judge's post-processing, and the quality measures (exact on a perfect model)."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from comat.judges.detector import Detector, detections_from_outputs
from comat.models.segmenter import load_segmenter
from comat.toy import quality_vision as qv
from comat.toy.prompts import SHAPES
from comat.toy.recipes_vision import (
    GroundingDinoRecipe,
    SamRecipe,
    detector_processor,
    detector_tokenizer,
    imagenet_normalize,
)
from comat.toy.world import SIZE, sample_batch


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    torch.manual_seed(0)
    zoo = tmp_path_factory.mktemp("zoo")
    recipes = {"grounding_dino": GroundingDinoRecipe(), "sam": SamRecipe()}
    modules = {name: r.build(zoo) for name, r in recipes.items()}
    return zoo, recipes, modules


@pytest.fixture(scope="module")
def exported(built):
    zoo, recipes, modules = built
    for name, r in recipes.items():
        r.export(modules[name], zoo)
    return zoo


def test_tokenizer_keeps_the_ids_groundingdino_splits_phrases_on():
    from transformers.models.grounding_dino.modeling_grounding_dino import SPECIAL_TOKENS, build_label_maps

    tok = detector_tokenizer()
    ids = tok("circle . squares .").input_ids
    assert set(SPECIAL_TOKENS) == {101, 102, 1012, 1029}
    assert ids[0] == 101 and ids[-1] == 102 and ids[2] == ids[4] == 1012
    assert tok.convert_ids_to_tokens(ids[1]) == "circle" and tok.convert_ids_to_tokens(ids[3]) == "squares"
    maps = build_label_maps(torch.zeros(1, 1, 8), torch.tensor([ids + [0, 0]]))[0]
    assert maps.tolist() == [[0, 1, 0, 0, 0, 0, 0, 0], [0, 0, 0, 1, 0, 0, 0, 0]]


def test_phrase_targets_come_from_each_images_own_query():
    from comat.toy.recipes_vision import _criterion, grounding_dino_config

    # Three images whose queries put phrase 0 on different tokens; transformers 5.23 gives image 2 image 0's.
    maps = (torch.tensor([[0, 1, 0, 0, 0, 0], [0, 0, 0, 1, 0, 0]]),) * 2 + (torch.tensor([[0, 0, 0, 0, 1, 0]]),)
    criterion = _criterion(grounding_dino_config(1030))
    onehot = criterion._get_target_classes_one_hot(
        {"logits": torch.zeros(3, 2, 6), "label_maps": maps}, [{"class_labels": torch.tensor([0, 1])}] * 2
        + [{"class_labels": torch.tensor([0])}], [(torch.tensor([0, 1]), torch.tensor([0, 1]))] * 2
        + [(torch.tensor([1]), torch.tensor([0]))])
    assert onehot[:2].argmax(-1).tolist() == [[1, 3], [1, 3]]
    assert onehot[2, 1].tolist() == [0, 0, 0, 0, 1, 0] and onehot[2, 0].sum() == 0


def test_processor_matches_training_normalisation():
    images, _, _ = sample_batch(2, np.random.default_rng(0))
    pil = [PIL.Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for im in images]
    px = detector_processor()(images=pil, text=["circle ."] * 2, return_tensors="pt")["pixel_values"]
    assert px.shape == (2, 3, SIZE, SIZE)
    torch.testing.assert_close(px, imagenet_normalize(images), atol=1e-5, rtol=0)


def test_zoo_budget(built):
    _, _, modules = built
    n = sum(p.numel() for m in modules.values() for mm in m.values() for p in mm.parameters())
    assert n < 2_000_000


@pytest.mark.parametrize("name", ["grounding_dino", "sam"])
def test_one_loss_step_is_finite_and_reaches_every_trainable_tensor(built, name):
    _, recipes, modules = built
    recipe = recipes[name]
    recipe.batch = 3
    ms = modules[name]
    for m in ms.values():
        m.zero_grad(set_to_none=True)
        m.train()
    loss, logs = recipe.loss(ms, np.random.default_rng(1))
    assert torch.isfinite(loss) and all(np.isfinite(v) for v in logs.values())
    loss.backward()
    named = [(k, p) for m in ms.values() for k, p in m.named_parameters()]
    assert all(p.grad is None for _, p in named if not p.requires_grad)
    if name == "grounding_dino":  # the text path is frozen (see freeze_text_path), the image side trains
        assert not any(p.requires_grad for p in ms["detector"].model.text_backbone.parameters())
        assert all(p.grad is not None for p in ms["detector"].model.backbone.parameters()
                   if p.ndim > 1)  # weights of the image backbone (its unused final norm is 1-D)
    missing = [k for k, p in named if p.requires_grad and p.grad is None]
    # Unused by design: SAM's mask-prompt and point embeddings with box prompts, its extra multimask
    # outputs, and the Swin backbone's final norm (GroundingDINO reads the stage outputs).
    allowed = ("model.backbone.conv_encoder.model.swin.layernorm.", "prompt_encoder.mask_downscaling",
               "prompt_encoder.no_mask_embed", "prompt_encoder.point_embeddings", "prompt_encoder.not_a_point_embed",
               "mask_decoder.output_hypernetworks_mlps.1", "mask_decoder.output_hypernetworks_mlps.2",
               "mask_decoder.output_hypernetworks_mlps.3")
    assert [k for k in missing if not k.startswith(allowed)] == []
    assert all(torch.isfinite(p.grad).all() for _, p in named if p.grad is not None)


def test_export_loads_through_the_real_loaders(exported):
    seg = load_segmenter(exported / "grounding_dino", exported / "sam", sam_type="custom",
                         box_threshold=0.0, text_threshold=0.0)
    assert seg.detector.dtype == torch.float32
    _, _, rendered = sample_batch(1, np.random.default_rng(0), as_tensor=False)
    masks = seg(rendered[0].image, ["circle", "squares"])
    assert masks.shape == (2, SIZE, SIZE) and masks.dtype == torch.bool
    det = Detector.load(exported / "grounding_dino", threshold=0.0)
    out = det.detect([rendered[0].image, torch.rand(3, SIZE, SIZE)], ["circle", "square", "circle"])
    assert len(out) == 2 and out[0]
    for label, score, (x0, y0, x1, y1) in out[0]:
        assert label in ("circle", "square") and 0 <= score <= 1 and 0 <= x0 <= x1 <= SIZE and 0 <= y0 <= y1 <= SIZE
    assert [d[1] for d in out[0]] == sorted((d[1] for d in out[0]), reverse=True)


def test_detector_post_processing_on_hand_made_outputs():
    ids = torch.tensor([101, 104, 1012, 105, 1012, 102, 0, 0])  # [CLS] circle . square . [SEP] [PAD] [PAD]
    logits = torch.full((5, 8), -9.0)
    logits[0, 1] = 2.0  # circle, p = 0.88
    logits[1, 3] = 1.0  # square, p = 0.73
    logits[2, 3] = 0.5  # square again on the same place, p = 0.62: suppressed
    logits[3, 1] = -1.0  # circle below the threshold
    logits[4, 3] = 0.2  # a second, separate square, p = 0.55
    boxes = torch.tensor([[0.25, 0.25, 0.2, 0.2], [0.75, 0.5, 0.2, 0.4], [0.76, 0.5, 0.2, 0.4], [0.5, 0.5, 0.1, 0.1],
                          [0.1, 0.9, 0.1, 0.1]])
    dets = detections_from_outputs(logits, boxes, ids, ["circle", "square"], (64, 128), threshold=0.5, nms_iou=0.5)
    assert [(d[0], round(d[1], 2)) for d in dets] == [("circle", 0.88), ("square", 0.73), ("square", 0.55)]
    np.testing.assert_allclose(dets[0][2], (19.2, 9.6, 44.8, 22.4), atol=1e-4)  # (x, y) scaled by (w=128, h=64)
    np.testing.assert_allclose(dets[2][2], (6.4, 54.4, 19.2, 60.8), atol=1e-4)


def test_t2i_spatial_rule():
    left, right, low = (0, 20, 10, 30), (30, 22, 40, 32), (2, 50, 12, 60)
    assert qv.t2i_spatial_holds("on the left of", left, right)
    assert qv.t2i_spatial_holds("on the right of", right, left)
    assert qv.t2i_spatial_holds("on the top of", left, low) and not qv.t2i_spatial_holds("on the top of", low, left)
    assert qv.t2i_spatial_holds("on the bottom of", low, left)
    assert not qv.t2i_spatial_holds("on the left of", left, low)


class _Perfect:
    """Answers from the ground truth of the very scenes the measures render (looked up by pixels)."""

    def __init__(self, n: int, seed: int, swap: bool = False):
        self.truth = {r.image.tobytes(): r for r in qv.heldout_scenes(n, seed)}
        self.swap = swap

    def detect(self, images, labels):
        out = []
        for im in images:
            r = self.truth[im.tobytes()]
            shapes = [o.shape for o in r.scene.objects]
            if self.swap:  # the wrong noun on every object
                shapes = [SHAPES[(SHAPES.index(s) + 1) % len(SHAPES)] for s in shapes]
            out.append([(s, 0.9, tuple(map(float, b))) for s, b in zip(shapes, r.boxes) if s in labels])
        return out

    def __call__(self, image, nouns):
        r = self.truth[image.tobytes()]
        masks = [r.masks[r.scene.objects_of(i)[-1]] for i in range(len(nouns))]
        if self.swap:
            return torch.zeros(len(nouns), SIZE, SIZE, dtype=torch.bool)
        return torch.from_numpy(np.stack(masks))


def test_measures_are_exact_on_a_perfect_model_and_fail_a_wrong_one():
    assert qv.detector_recall(_Perfect(60, 3), n_scenes=60, seed=3) == 1.0
    assert qv.segmenter_miou(_Perfect(30, 4), n_scenes=30, seed=4) == 1.0
    assert qv.detector_recall(_Perfect(60, 3, swap=True), n_scenes=60, seed=3) == 0.0
    assert qv.segmenter_miou(_Perfect(30, 4, swap=True), n_scenes=30, seed=4) == 0.0


def test_heldout_scenes_are_multi_object_eval_prompts():
    from comat.toy.prompts import split_of

    scenes = qv.heldout_scenes(21, 0)
    assert all(split_of(r.scene.spec) != "train" for r in scenes)
    assert all(len(r.scene.objects) >= 2 for r in scenes)
    assert {r.scene.category for r in scenes} == set(qv.MULTI_OBJECT)
    assert [r.prompt for r in qv.heldout_scenes(21, 0)] == [r.prompt for r in scenes]
