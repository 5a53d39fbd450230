import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from comat.core.errors import ComatError
from comat.core.results import read_jsonl
from comat.evaluation.runner import EvalConfig, evaluate
from comat.judges.fid import (
    InceptionFeatures,
    Statistics,
    cached_statistics,
    centre_crop_resize,
    decode_features,
    encode_features,
    extract,
    frechet_distance,
    inception_weights,
    load_extractor,
)
from comat_benchmarks.coco_fid import draw_coco_sample


def _stats(mu, sigma) -> Statistics:
    return Statistics(np.atleast_1d(np.asarray(mu, float)), np.atleast_2d(np.asarray(sigma, float)), 100)


def _random_spd(rng, d):
    a = rng.normal(size=(d, 2 * d))
    return a @ a.T / (2 * d) + 0.1 * np.eye(d)


def _eigen_reference(a: Statistics, b: Statistics) -> float:
    """tr (S_a S_b)^(1/2) = tr (S_a^(1/2) S_b S_a^(1/2))^(1/2), both roots from symmetric eigendecompositions."""
    w, v = np.linalg.eigh(a.sigma)
    root = (v * np.sqrt(w)) @ v.T
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(root @ b.sigma @ root), 0, None)).sum()
    diff = a.mu - b.mu
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * tr_covmean)


# --- the Frechet distance -------------------------------------------------------------------------------------

def test_identical_statistics_are_at_distance_zero():
    rng = np.random.default_rng(0)
    s = _stats(rng.normal(size=6), _random_spd(rng, 6))
    assert frechet_distance(s, s) == pytest.approx(0.0, abs=1e-9)


def test_one_dimensional_closed_form():
    # (mu1 - mu2)^2 + s1^2 + s2^2 - 2 s1 s2 with variances 4 and 9: 9 + 4 + 9 - 12
    assert frechet_distance(_stats(1.0, 4.0), _stats(4.0, 9.0)) == pytest.approx(10.0, abs=1e-12)


def test_diagonal_hand_case():
    # |d|^2 = 5; traces 5 + 5; S_a S_b = diag(4, 4), root diag(2, 2), trace 4 -> 5 + 10 - 8
    a, b = _stats([0, 0], np.diag([1.0, 4.0])), _stats([1, 2], np.diag([4.0, 1.0]))
    assert frechet_distance(a, b) == pytest.approx(7.0, abs=1e-12)


def test_random_covariances_match_an_eigendecomposition_and_torch_fidelity():
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    rng = np.random.default_rng(1)
    for d in (3, 16, 64):
        a = _stats(rng.normal(size=d), _random_spd(rng, d))
        b = _stats(rng.normal(size=d), _random_spd(rng, d))
        fid = frechet_distance(a, b)
        assert fid == pytest.approx(_eigen_reference(a, b), rel=1e-9)
        theirs = fid_statistics_to_metric({"mu": a.mu, "sigma": a.sigma}, {"mu": b.mu, "sigma": b.sigma}, False)
        assert fid == pytest.approx(theirs[KEY_METRIC_FID], rel=1e-9)


def test_statistics_are_float64_with_unbiased_covariance_and_round_trip(tmp_path):
    s = Statistics.of(np.array([[0.0, 1.0], [2.0, 5.0]], dtype=np.float32))
    assert s.mu.dtype == s.sigma.dtype == np.float64 and s.n == 2
    np.testing.assert_array_equal(s.mu, [1.0, 3.0])
    np.testing.assert_array_equal(s.sigma, [[2.0, 4.0], [4.0, 8.0]])  # ddof 1: ((0-1)^2 + (2-1)^2) / 1 = 2
    back = Statistics.load(s.save(tmp_path / "s.npz", {"what": "test"}))
    np.testing.assert_array_equal(back.sigma, s.sigma)
    assert back.n == 2
    with pytest.raises(ComatError, match="at least 2 feature vectors"):
        Statistics.of(np.zeros((1, 4)))


def test_fewer_samples_than_dimensions_still_gives_a_finite_distance():
    rng = np.random.default_rng(2)
    a, b = Statistics.of(rng.normal(size=(5, 12))), Statistics.of(rng.normal(size=(5, 12)) + 1)
    assert np.isfinite(frechet_distance(a, b))
    with pytest.raises(ComatError, match="differ in dimension"):
        frechet_distance(a, Statistics.of(rng.normal(size=(5, 3))))


def test_reference_statistics_cache_is_keyed_and_reused():
    calls = []

    def features():
        calls.append(1)
        return np.random.default_rng(3).normal(size=(10, 4))

    first, computed = cached_statistics("ext@1", "data@1", "crop 32", features)
    again, computed_again = cached_statistics("ext@1", "data@1", "crop 32", features)
    assert (computed, computed_again, len(calls)) == (10, 0, 1)
    np.testing.assert_array_equal(first.sigma, again.sigma)
    for changed in (("ext@2", "data@1", "crop 32"), ("ext@1", "data@2", "crop 32"), ("ext@1", "data@1", "crop 64")):
        assert cached_statistics(*changed, features)[1] == 10
    assert len(calls) == 4


# --- images and extractors ------------------------------------------------------------------------------------

def test_centre_crop_resize():
    wide = np.zeros((4, 6, 3), np.uint8)
    wide[:, :, 0] = np.arange(6)[None, :]  # column index in the red channel
    crop = centre_crop_resize(wide, 4)
    assert crop.shape == (4, 4, 3) and crop[0, :, 0].tolist() == [1, 2, 3, 4]  # the middle four columns
    square = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    np.testing.assert_array_equal(centre_crop_resize(square, 8), square)  # already at size: untouched
    assert centre_crop_resize(PIL.Image.fromarray(wide), 2).shape == (2, 2, 3)


def test_features_survive_the_judge_cache_encoding_exactly():
    row = np.random.default_rng(0).normal(size=2048).astype(np.float32)
    np.testing.assert_array_equal(decode_features(encode_features(row)), row)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from tests.tiny import save_tiny_clip

    return str(save_tiny_clip(tmp_path_factory.mktemp("clip")))


def test_clip_extractor_is_the_pooled_vision_output(tiny_clip):
    from transformers import CLIPModel, CLIPProcessor

    extractor = load_extractor(tiny_clip)
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    feats = extract(extractor, images, batch_size=2)
    assert feats.shape == (3, 32) == (3, extractor.dims) and feats.dtype == np.float32
    model, processor = CLIPModel.from_pretrained(tiny_clip), CLIPProcessor.from_pretrained(tiny_clip)
    with torch.no_grad():
        direct = model.vision_model(pixel_values=processor(images=list(images), return_tensors="pt").pixel_values)
    np.testing.assert_allclose(feats, direct.pooler_output.numpy(), rtol=1e-5, atol=1e-6)


def test_inception_extractor_loads_weights_without_unpickling(tmp_path):
    from comat.judges.panel import Judges
    from comat.models.fingerprint import file_sha256

    random_net = InceptionFeatures(None)
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    feats = random_net(x)
    assert feats.shape == (2, 2048) and np.isfinite(feats).all()
    weights = tmp_path / "weights.pth"
    torch.save(random_net.net.state_dict(), weights)
    ref = f"inception-v3:{weights}"
    np.testing.assert_array_equal(load_extractor(ref)(x), feats)
    judges = Judges({"fid_features": ref})
    assert judges.id("fid_features") == f"fid_features:{ref}@{file_sha256(weights)[:16]}"

    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ComatError, match="other.pth: not torch-fidelity's Inception-v3"):
        load_extractor(f"inception-v3:{tmp_path / 'other.pth'}")


def _offline(*_a, **_k):
    raise OSError("no network")


def test_absent_inception_weights_offline_name_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr("comat.judges.fid.urllib.request.urlopen", _offline)
    with pytest.raises(ComatError, match=r"weights-inception-2015-12-05-6726825d\.pth are not in .*"
                                         r"--option inception_weights=PATH"):
        inception_weights()
    with pytest.raises(ComatError, match="nowhere.pth: no such file"):
        inception_weights(f"inception-v3:{tmp_path / 'nowhere.pth'}")


# --- the COCO sample ------------------------------------------------------------------------------------------

def _coco(images: dict[int, list[str]]) -> dict:
    anns, k = [], 100
    for image, captions in images.items():
        for c in captions:
            anns.append({"image_id": image, "id": k, "caption": c})
            k += 1
    return {"info": {}, "images": [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg", "width": 40, "height": 30}
                                   for i in images], "annotations": anns}


def _write(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def test_sample_drawing_is_deterministic_distinct_and_faithful(tmp_path):
    captions = {i: [f"photo {i} number {j}" for j in range(5)] for i in range(1, 31)}
    captions[7] = ["A cat\n sitting  on a mat ", "a dog"]
    path = _write(tmp_path / "captions_val2014.json", _coco(captions))
    first = draw_coco_sample(path, 10, seed=0)
    assert first == draw_coco_sample(path, 10, seed=0)
    assert first != draw_coco_sample(path, 10, seed=1)
    ids = [p["image_id"] for p in first]
    assert len(set(ids)) == 10 and ids == sorted(ids)
    raw = {a["id"]: a for a in _coco(captions)["annotations"]}
    for p in first:
        assert raw[p["caption_id"]]["image_id"] == p["image_id"]
        assert p["caption"] == " ".join(raw[p["caption_id"]]["caption"].split())
        assert p["file_name"] == f"COCO_val2014_{p['image_id']:012d}.jpg"
    whole = draw_coco_sample(path, 30, seed=0)
    assert next(p["caption"] for p in whole if p["image_id"] == 7) in ("A cat sitting on a mat", "a dog")


def test_a_caption_already_drawn_is_not_drawn_again(tmp_path):
    path = _write(tmp_path / "c.json", _coco({i: ["a photo", f"a photo of thing {i}"] for i in range(1, 6)}))
    for seed in range(5):
        drawn = [p["caption"] for p in draw_coco_sample(path, 5, seed)]
        assert len(set(drawn)) == 5 and drawn.count("a photo") <= 1


@pytest.mark.parametrize("content, message", [
    ({"images": []}, r"captions_val2014.json: no 'annotations' list"),
    ([], r"captions_val2014.json: no 'images' list"),
    ({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1, "id": 5}]},
     r"annotations\[0\] has no str 'caption'"),
    ({"images": [{"id": 1}], "annotations": []}, r"images\[0\] has no str 'file_name'"),
    ({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 2, "id": 5, "caption": "x"}]},
     r"annotations\[0\].image_id 2 is not among 'images'"),
])
def test_bad_annotation_files_are_named(tmp_path, content, message):
    path = _write(tmp_path / "captions_val2014.json", content)
    with pytest.raises(ComatError, match=message):
        draw_coco_sample(path, 1, 0)


def test_annotation_file_that_is_not_json(tmp_path):
    path = tmp_path / "captions_val2014.json"
    path.write_text('{"images": [],\n oops}')
    with pytest.raises(ComatError, match=r"captions_val2014.json: not JSON \(line 2"):
        draw_coco_sample(path, 1, 0)


# --- end to end through `comat eval` --------------------------------------------------------------------------

N = 40  # more samples than the tiny CLIP's 32 feature dimensions, so the covariances have full rank


@pytest.fixture
def fast(monkeypatch):
    from comat.evaluation import registry

    real_load = registry.load_protocol
    quick = {"sampler": {"steps": 2, "resolution": 32}}
    monkeypatch.setattr("comat.evaluation.runner.load_protocol", lambda n, w, o=None: real_load(n, w, {**(o or {}), **quick}))


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    captions = {i: [f"a {thing} number {i}" for thing in ("red box", "blue ball", "green cone")]
                for i in range(1, N + 9)}
    _write(root / "annotations" / "captions_val2014.json", _coco(captions))
    rng = np.random.default_rng(0)
    (root / "val2014").mkdir()
    for i in captions:  # 40 x 30: not square, so the centre crop matters
        image = PIL.Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
        image.save(root / "val2014" / f"COCO_val2014_{i:012d}.jpg")
    return root


def _cfg(tiny_sd_dir, tiny_clip, world, **kw):
    return EvalConfig(model=str(tiny_sd_dir), world=world, judges={"fid_features": tiny_clip},
                      options={"sample_size": N}, batch_size=8, device="cpu", **kw)


def _direct_fid(tiny_clip, generated: list[str], reference: list[np.ndarray]) -> float:
    extractor = load_extractor(tiny_clip)
    gen = extract(extractor, [centre_crop_resize(PIL.Image.open(p), 32) for p in generated])
    ref = extract(extractor, [centre_crop_resize(r, 32) for r in reference])
    return frechet_distance(Statistics.of(gen), Statistics.of(ref))


def test_real_world_run_records_its_sample_and_reuses_reference_statistics(fast, tiny_sd_dir, tiny_clip, coco_dir,
                                                                            tmp_path, monkeypatch):
    first = evaluate("coco-fid", _cfg(tiny_sd_dir, tiny_clip, "real", data=str(coco_dir)), tmp_path / "a")
    agg = first["aggregate"]
    assert (agg["generated_images"], agg["reference_images"], agg["reference_features_computed"]) == (N, N, N)
    records = read_jsonl(first["files"]["samples"])
    assert len(records) == N == len({r["prompt"] for r in records})
    raw = json.loads((coco_dir / "annotations" / "captions_val2014.json").read_text())
    ann = {a["id"]: a for a in raw["annotations"]}
    assert all(ann[int(r["id"])]["image_id"] == r["image_id"] for r in records)
    reference = [np.asarray(PIL.Image.open(coco_dir / "val2014" / r["file_name"]).convert("RGB")) for r in records]
    assert agg["scores"]["fid"] == pytest.approx(_direct_fid(tiny_clip, [r["image"] for r in records], reference),
                                                 rel=1e-9)
    assert read_jsonl(first["files"]["sample"]) == draw_coco_sample(coco_dir / "annotations" / "captions_val2014.json",
                                                                    N, 0)
    manifest = json.loads(first["files"]["manifest"].read_text())
    annotation, images, sample = manifest["data"]
    assert annotation["name"] == "annotations/captions_val2014.json" and not annotation["verified"]
    assert len(annotation["sha256"]) == 64 and sample["size"] == N and sample["year"] == "val2014"
    md = first["files"]["markdown"].read_text()
    assert f"sample_size={N}" in md and "reference statistics of 40 images computed" in md

    from comat.judges.fid import FidFeatures

    def no_model(*_a, **_k):
        raise AssertionError("a cached re-run must not load the feature extractor")

    monkeypatch.setattr(FidFeatures, "load", classmethod(no_model))
    again = evaluate("coco-fid", _cfg(tiny_sd_dir, tiny_clip, "real", data=str(coco_dir)), tmp_path / "b")
    counts = again["manifest"]["counts"]
    assert counts["generated"] == counts["judge_answers_computed"] == 0
    assert again["aggregate"]["reference_features_computed"] == 0
    assert again["aggregate"]["scores"] == agg["scores"]


def test_toy_world_run_uses_distinct_toy_renders(fast, tiny_sd_dir, tiny_clip, tmp_path):
    from comat.toy.world import caption_pairs

    run = evaluate("coco-fid", _cfg(tiny_sd_dir, tiny_clip, "toy"), tmp_path / "toy")
    records = read_jsonl(run["files"]["samples"])
    assert len(records) == N == len({r["prompt"] for r in records}) and records[0]["category"] == "toy"
    images, captions = caption_pairs(2 * N, 0)
    assert all(captions[r["index"]] == r["prompt"] for r in records)
    assert [d["index"] for d in read_jsonl(run["files"]["sample"])] == [r["index"] for r in records]
    fid = _direct_fid(tiny_clip, [r["image"] for r in records], [images[r["index"]] for r in records])
    assert run["aggregate"]["scores"]["fid"] == pytest.approx(fid, rel=1e-9)
    assert run["manifest"]["judges"]["fid_features"].startswith(f"fid_features:{tiny_clip}@")


def test_missing_real_image_is_named_before_generating(fast, tiny_sd_dir, tiny_clip, tmp_path, coco_dir):
    import shutil

    data = tmp_path / "coco"
    shutil.copytree(coco_dir, data)
    drawn = draw_coco_sample(data / "annotations" / "captions_val2014.json", N, 0)
    (data / "val2014" / drawn[3]["file_name"]).unlink()
    gone = drawn[3]
    with pytest.raises(ComatError, match=rf"{gone['file_name']}: missing \(file_name of image {gone['image_id']}"):
        evaluate("coco-fid", _cfg(tiny_sd_dir, tiny_clip, "real", data=str(data)), tmp_path / "out")
    with pytest.raises(ComatError, match="needs the COCO 2014 validation set: pass --data DIR"):
        evaluate("coco-fid", _cfg(tiny_sd_dir, tiny_clip, "real"), tmp_path / "out")


def test_inception_weights_option_is_checked_before_generating(tmp_path, tiny_clip, monkeypatch):
    from comat.evaluation.registry import load_protocol
    from comat_benchmarks.coco_fid import CocoFid

    def bench(options=None, judges=None):
        return CocoFid(load_protocol("coco-fid", "real", {"options": options or {}, "judges": judges or {}}))

    weights = tmp_path / "w.pth"
    with pytest.raises(ComatError, match="w.pth: no such file; download .*weights-inception-2015-12-05"):
        bench({"inception_weights": str(weights)}).extractor_ref()
    weights.write_bytes(b"")
    assert bench({"inception_weights": str(weights)}).extractor_ref() == f"inception-v3:{weights.resolve()}"
    with pytest.raises(ComatError, match="inception_weights applies to the inception-v3 extractor"):
        bench({"inception_weights": str(weights)}, {"fid_features": tiny_clip}).extractor_ref()
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr("comat.judges.fid.urllib.request.urlopen", _offline)
    with pytest.raises(ComatError, match="weights-inception-2015-12-05-6726825d.pth are not in"):
        bench().samples()  # before the annotation file is even looked at
