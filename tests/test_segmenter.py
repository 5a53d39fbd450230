"""Grounded-SAM segmenter: tiny GroundingDINO + tiny SAM built from configs, saved, and loaded back."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch

from comat.core.errors import ComatError
from comat.models import segmenter as seg
from comat.models.segmenter import (
    best_box_per_noun,
    build_custom_sam,
    detection_query,
    load_sam,
    load_sam_state_dict,
    load_segmenter,
    match_label,
    save_sam,
)

NOUNS = ["cat", "dog", "bird", "car", "traffic", "light", "skate", "##board", "red"]
TINY_SAM = {
    "img_size": 64,
    "patch_size": 8,
    "embed_dim": 32,
    "depth": 2,
    "num_heads": 2,
    "out_chans": 32,
    "window_size": 4,
    "global_attn_indexes": [1],
    "mask_in_chans": 4,
    "decoder_depth": 1,
    "decoder_mlp_dim": 64,
    "decoder_num_heads": 2,
    "iou_head_hidden_dim": 32,
}


@pytest.fixture(scope="module")
def detector_dir(tmp_path_factory):
    from transformers import (
        BertConfig,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SwinConfig,
    )

    from comat.models.tokenizer import word_tokenizer

    out = tmp_path_factory.mktemp("gdino")
    tok = word_tokenizer(NOUNS, out / "vocab")
    torch.manual_seed(0)
    config = GroundingDinoConfig(
        # patch 2 on 64 px keeps the coarsest extra level at 2x2 (GroupNorm needs > 1 value per channel).
        backbone_config=SwinConfig(
            image_size=64, patch_size=2, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
            window_size=4, out_features=["stage2", "stage3", "stage4"],
        ),
        text_config=BertConfig(
            vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=64,
        ),
        d_model=32, num_queries=8, encoder_layers=1, decoder_layers=2,  # 1 decoder layer trips weight tying
        encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_n_points=1, decoder_n_points=1, max_text_len=32,
    )
    GroundingDinoForObjectDetection(config).save_pretrained(out)
    processor = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 64}), tokenizer=tok
    )
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def sam_dir(tmp_path_factory):
    torch.manual_seed(0)
    return save_sam(build_custom_sam(TINY_SAM), tmp_path_factory.mktemp("sam"), TINY_SAM)


@pytest.fixture(scope="module")
def segmenter(detector_dir, sam_dir):
    return load_segmenter(detector_dir, sam_dir, sam_type="custom", box_threshold=0.0, text_threshold=0.0)


# ------------------------------------------------------------------------------ label -> noun mapping


def test_detection_query_follows_groundingdino_convention():
    assert detection_query(["cat", "traffic light"]) == "cat . traffic light ."


@pytest.mark.parametrize(
    "label, expected",
    [
        ("cat", [0]),
        ("cat. [SEP]", [0]),  # separators and special tokens the processor decodes are ignored
        ("red car", [2]),  # extra words around a noun
        ("cat. dog.", [0, 1]),  # one box grounded on two phrases counts for both
        ("traffic light", [3]),  # the longer noun wins over "light" inside it
        ("light", [4]),  # a noun named whole beats being a fragment of a longer noun
        ("traffic", [3]),  # fragment of a multi-word noun
        ("##board", [5]),  # lone word-piece of a noun
        (". [SEP]", []),
        ("", []),
    ],
)
def test_match_label(label, expected):
    nouns = ["cat", "dog", "car", "traffic light", "light", "skateboard"]
    assert match_label(label, nouns) == expected


def test_best_box_per_noun_picks_highest_score_and_reports_absent():
    nouns = ["cat", "dog", "bird"]
    boxes = torch.tensor([[0, 0, 10, 10], [5, 5, 20, 20], [1, 2, 3, 4], [7, 7, 8, 8]], dtype=torch.float)
    scores = torch.tensor([0.4, 0.9, 0.5, 0.3])
    labels = ["cat", "cat", "dog [SEP]", "car"]
    best = best_box_per_noun(nouns, boxes, scores, labels)
    assert torch.equal(best[0], boxes[1])  # two cat boxes: the more confident one
    assert torch.equal(best[1], boxes[2])
    assert best[2] is None  # no box for bird; the "car" box belongs to no query noun
    with pytest.raises(ValueError):
        best_box_per_noun(nouns, boxes, scores, labels[:2])


# ------------------------------------------------------------------------------ end to end


def test_segmenter_shapes_and_dtype(segmenter):
    image = torch.rand(3, 40, 48)
    masks = segmenter(image, ["cat", "Dog", "cat"])
    assert masks.shape == (3, 40, 48) and masks.dtype == torch.bool
    assert torch.equal(masks[0], masks[2])  # repeated noun: one query phrase, one mask
    assert segmenter(image[None], []).shape == (0, 40, 48)
    pil = PIL.Image.fromarray((image.permute(1, 2, 0).numpy() * 255).astype(np.uint8))
    assert segmenter(pil, ["bird"]).shape == (1, 40, 48)


def test_noun_not_found_gives_empty_mask(detector_dir, sam_dir):
    nothing = load_segmenter(detector_dir, sam_dir / "model.safetensors", sam_type="custom", box_threshold=1.01)
    masks = nothing(PIL.Image.new("RGB", (48, 40), (200, 20, 20)), ["cat", "dog"])
    assert masks.shape == (2, 40, 48) and not masks.any()


def test_masks_come_from_sam_box_prompts(segmenter, monkeypatch):
    box = torch.tensor([4.0, 6.0, 30.0, 36.0])
    monkeypatch.setattr(segmenter, "detect", lambda image, nouns: [box, None])
    image = (torch.rand(3, 40, 48) * 255).to(torch.uint8)
    masks = segmenter(image, ["cat", "bird"])
    segmenter.predictor.set_image(image.permute(1, 2, 0).numpy())
    expected, _, _ = segmenter.predictor.predict(box=box.numpy(), multimask_output=False)
    assert np.array_equal(masks[0].numpy(), expected[0])
    assert not masks[1].any()


def test_detect_maps_labels_to_nouns(segmenter):
    # Zero thresholds keep every query and every text token, so each box names every noun.
    boxes = segmenter.detect(np.zeros((40, 48, 3), np.uint8), ["cat", "dog"])
    assert len(boxes) == 2 and all(b is not None and b.shape == (4,) for b in boxes)


# ------------------------------------------------------------------------------ SAM weights


def test_custom_sam_roundtrip(sam_dir):
    config = json.loads((sam_dir / "sam_config.json").read_text())
    assert config["img_size"] == 64 and config["pixel_mean"] == seg.SAM_CONFIG_DEFAULTS["pixel_mean"]
    loaded = load_sam(sam_dir, "custom")
    saved = load_sam_state_dict(sam_dir / "model.safetensors")
    assert saved.keys() == loaded.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in loaded.state_dict().items())


def test_sam_pth_loads_with_weights_only(tmp_path, sam_dir):
    state = load_sam_state_dict(sam_dir / "model.safetensors")
    torch.save(state, tmp_path / "sam.pth")
    (tmp_path / "sam_config.json").write_text((sam_dir / "sam_config.json").read_text())
    loaded = load_sam(tmp_path / "sam.pth", "custom")
    assert all(torch.equal(state[k], v) for k, v in loaded.state_dict().items())


class _Payload:
    ran = False

    def __reduce__(self):
        return (_Payload._boom, ())

    @staticmethod
    def _boom():
        _Payload.ran = True
        return {}


def test_sam_pickle_is_refused(tmp_path):
    torch.save({"w": torch.zeros(1), "x": _Payload()}, tmp_path / "evil.pth")
    with pytest.raises(ComatError, match="evil.pth.*refused"):
        load_sam_state_dict(tmp_path / "evil.pth")
    assert not _Payload.ran


def test_custom_sam_config_errors(tmp_path, sam_dir):
    with pytest.raises(ComatError, match="unknown keys"):
        build_custom_sam({"img_sz": 64})
    with pytest.raises(ComatError, match="same"):
        build_custom_sam({**TINY_SAM, "prompt_embed_dim": 16})
    with pytest.raises(ComatError, match="config"):
        save_sam(build_custom_sam(TINY_SAM), tmp_path / "bad", {**TINY_SAM, "img_size": 128})
    # weights that do not fit the config name the file and the fix
    (tmp_path / "mismatch").mkdir()
    (tmp_path / "mismatch" / "model.safetensors").write_bytes((sam_dir / "model.safetensors").read_bytes())
    (tmp_path / "mismatch" / "sam_config.json").write_text(json.dumps({**TINY_SAM, "depth": 3}))
    with pytest.raises(ComatError, match="does not fit sam_type 'custom'"):
        load_sam(tmp_path / "mismatch", "custom")


# ------------------------------------------------------------------------------ missing paths


def test_missing_paths_are_explained(tmp_path, detector_dir, sam_dir):
    missing = tmp_path / "nowhere"
    with pytest.raises(ComatError, match=f"GroundingDINO detector: .*{missing}"):
        load_segmenter(missing, sam_dir, sam_type="custom")
    with pytest.raises(ComatError, match="no config.json"):
        load_segmenter(tmp_path, sam_dir, sam_type="custom")
    with pytest.raises(ComatError, match=f"SAM checkpoint '{missing}/sam_vit_b.pth' does not exist"):
        load_segmenter(detector_dir, missing / "sam_vit_b.pth")
    with pytest.raises(ComatError, match=f"SAM weights: .*{missing}"):
        load_sam(missing)
    with pytest.raises(ComatError, match="exactly one checkpoint.*found none"):
        load_sam(tmp_path)
    (tmp_path / "w.safetensors").write_bytes((sam_dir / "model.safetensors").read_bytes())
    with pytest.raises(ComatError, match="sam_config.json"):
        load_sam(tmp_path, "custom")
    with pytest.raises(ComatError, match="unknown sam_type 'vit_q'"):
        load_sam(tmp_path, "vit_q")


def test_wrapped_pth_state_dict_is_unwrapped(tmp_path, sam_dir):
    state = load_sam_state_dict(sam_dir / "model.safetensors")
    torch.save({"model": state, "epoch": 3}, tmp_path / "ckpt.pt")
    assert load_sam_state_dict(tmp_path / "ckpt.pt").keys() == state.keys()
