import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from comat.core.errors import ComatError
from comat.core.results import read_jsonl
from comat.evaluation.runner import EvalConfig, evaluate
from comat.models.parsing import load_spacy
from comat_benchmarks.t2i_compbench import (
    blip_vqa_score,
    complex_objects,
    find_relation,
    noun_phrase_questions,
    position_score,
    simple_objects,
    spatial_score,
    three_in_one,
)

FIXTURES = Path(__file__).parent / "fixtures" / "t2i_compbench"


@pytest.fixture(scope="module")
def nlp():
    return load_spacy("en_core_web_sm")


def test_position_rule_hand_cases():
    left, right = (0, 0, 100, 100), (300, 0, 400, 100)
    assert position_score("on the left of", left, right, "faithful") == 1.0
    assert position_score("on the right of", left, right, "faithful") == 0.0
    assert position_score("on the right of", right, left, "faithful") == 1.0
    # overlapping: IoU = 50*100 / (2*10000 - 5000) = 1/3 -> 0.1 / (1/3)
    assert position_score("on the left of", (0, 0, 100, 100), (50, 0, 150, 100), "faithful") == pytest.approx(0.3)
    below = (0, 300, 100, 400)
    assert position_score("on the top of", left, below, "faithful") == 1.0  # y grows downwards: obj2 lower
    assert position_score("on the bottom of", below, left, "faithful") == 1.0
    # next to: near in x or y scores 1; far in both scores 150 / max distance
    assert position_score("next to", (0, 0, 10, 10), (400, 10, 410, 20), "faithful") == 1.0
    assert position_score("next to", (0, 0, 10, 10), (400, 300, 410, 310), "faithful") == pytest.approx(150 / 400)
    assert position_score("on top of", left, below, "faithful") == 0.0  # upstream has no branch for it
    assert position_score(None, left, right, "faithful") == 0.0
    with pytest.raises(ZeroDivisionError):
        position_score("on the left of", (0, 0, 0, 0), (5, 5, 5, 5), "faithful")
    assert position_score("on the left of", (0, 0, 0, 0), (10, 2, 10, 2), "fixed") == 1.0


def test_spatial_image_score_weights_and_floor():
    dets = [["dog", 0.9, [0, 0, 10, 10]], ["cat", 0.8, [30, 0, 40, 10]], ["dog", 0.99, [30, 0, 40, 10]]]
    # first detection per label (the 0.9 dog), position 1: 0.25*0.9 + 0.25*0.8 + 0.5
    assert spatial_score("dog", "cat", "on the left of", dets, 1.0, "faithful") == (pytest.approx(0.925), False)
    assert spatial_score("dog", "cat", "on the right of", dets, 1.0, "faithful") == (0.0, False)  # 0.425 < 0.5
    assert spatial_score("dog", "bird", "on the left of", dets, 1.0, "faithful") == (0.0, False)  # 0.225
    sure = [["dog", 1.0, [0, 0, 10, 10]], ["cat", 1.0, [0, 0, 10, 10]]]
    assert spatial_score("dog", "cat", "on the left of", sure, 1.0, "faithful")[0] == 0.5  # exactly 0.5 is kept
    # the 150-px distance rule is in UniDet's frame: scale decides whether the objects are "next to" each other
    far = [["dog", 1.0, [0, 0, 10, 10]], ["cat", 1.0, [400, 400, 410, 410]]]
    assert spatial_score("dog", "cat", "next to", far, 1.0, "faithful")[0] == pytest.approx(0.5 + 0.5 * 150 / 400)
    assert spatial_score("dog", "cat", "next to", far, 0.25, "faithful")[0] == 1.0
    degenerate = [["dog", 1.0, [0, 0, 0, 0]], ["cat", 1.0, [5, 5, 5, 5]]]
    assert spatial_score("dog", "cat", "on the left of", degenerate, 1.0, "faithful") == (0.5, True)


def test_blip_vqa_product_rounds_like_upstream():
    assert blip_vqa_score([]) == 1.0
    assert blip_vqa_score([0.9, 0.8, 0.7]) == 0.504
    assert blip_vqa_score([0.33333, 0.33333]) == 0.1111  # 0.3333 * 0.3333 = 0.11108889
    assert blip_vqa_score([0.99996]) == 1.0  # '%.4f' of each probability first


def test_noun_phrase_questions(nlp):
    assert noun_phrase_questions(nlp("a cat on the left of a dog")) == ["a cat?", "a dog?"]
    many = " and ".join(f"a {c} ball" for c in ("red", "blue", "green", "pink", "gray", "black", "white", "brown", "tan"))
    assert len(noun_phrase_questions(nlp(many))) == 8


def test_relation_search_quirks():
    assert find_relation("a linear bed on the left of a dog", "faithful") == "near"  # substring, list order
    assert find_relation("a linear bed on the left of a dog", "fixed") == "on the left of"
    assert find_relation("a hat on top of a rack", "faithful") == "on top of"
    assert find_relation("a hat on top of a rack", "fixed") == "on the top of"
    assert find_relation("A cat Next to a dog", "faithful") is None  # case-sensitive upstream


def test_object_extraction(nlp):
    assert simple_objects(nlp("a girl on the top of a frog"), "faithful") == ("person", "frog")
    doc = nlp("The red hat was on top of the brown coat rack.")
    assert complex_objects(doc, "faithful") == ("hat", "coat")  # the first noun after the phrase, as upstream
    doc = nlp("a dog on the top of a table")
    assert complex_objects(doc, "faithful") == (None, None)  # upstream's list lacks "on the top of"
    assert complex_objects(doc, "fixed") == ("dog", "table")
    assert simple_objects(nlp("two dogs next to three cats"), "fixed") == ("dog", "cat")


def test_three_in_one_routing():
    assert three_in_one("spatial", 0.6, 0.2, 0.3) == pytest.approx(0.4)
    assert three_in_one("action", 0.6, 0.2, 0.3) == pytest.approx(0.45)
    assert three_in_one("other", 0.6, 0.2, 0.3) == pytest.approx(1.1 / 3)


@pytest.fixture(scope="module")
def tiny_judges(tmp_path_factory):
    from tests.tiny import save_tiny_clip, save_tiny_grounding_dino, save_tiny_vqa

    root = tmp_path_factory.mktemp("judges")
    words = [".", "a", "the", "red", "blue", "hat", "dog", "cat", "giraffe", "lamp", "frog", "person", "rack", "backpack"]
    return {"vqa": str(save_tiny_vqa(root / "vqa", words)),
            "detector": str(save_tiny_grounding_dino(root / "det", words)),
            "clip": str(save_tiny_clip(root / "clip"))}


def _config(tiny_sd_dir, judges, **kw):
    return EvalConfig(model=str(tiny_sd_dir), data=str(FIXTURES), judges=judges, images_per_prompt=2, batch_size=4,
                      device="cpu", **kw)


def test_end_to_end_on_fixture_data_and_a_cached_rerun(tiny_sd_dir, tiny_judges, tmp_path, monkeypatch):
    from comat.evaluation import registry

    real_load = registry.load_protocol
    fast = {"sampler": {"steps": 2}}
    monkeypatch.setattr("comat.evaluation.runner.load_protocol", lambda n, w, o=None: real_load(n, w, {**(o or {}), **fast}))

    with pytest.raises(ComatError, match="sha256 .* is not the pinned"):
        evaluate("t2i-compbench", _config(tiny_sd_dir, tiny_judges), tmp_path / "a")
    first = evaluate("t2i-compbench", _config(tiny_sd_dir, tiny_judges, unpinned=True), tmp_path / "a")
    counts = first["manifest"]["counts"]
    assert counts["prompts"] == 13 and counts["images"] == 26 and counts["generated"] == 26
    records = read_jsonl(first["files"]["samples"])
    assert {r["category"] for r in records} == {"color", "shape", "texture", "spatial", "non_spatial", "complex"}
    complex_rows = [r for r in records if r["category"] == "complex"]
    assert sorted({r["split"] for r in complex_rows}) == ["action", "spatial"]
    for r in complex_rows:
        assert r["score"] == pytest.approx(three_in_one(r["split"], r["blip_vqa"], r["spatial"], r["clip"]))
    assert first["aggregate"]["train_overlap"]["color"] == 1
    md = first["files"]["markdown"].read_text()
    assert "mode=faithful" in md and "seeds=42..43" in md and "overlap" in md
    manifest = json.loads(first["files"]["manifest"].read_text())
    assert all(not d["verified"] for d in manifest["data"]) and manifest["judges"]["vqa"].startswith("vqa:")

    again = evaluate("t2i-compbench", _config(tiny_sd_dir, tiny_judges, unpinned=True), tmp_path / "b")
    assert again["manifest"]["counts"]["generated"] == 0
    assert again["manifest"]["counts"]["judge_answers_computed"] == 0
    assert again["aggregate"]["scores"] == first["aggregate"]["scores"]


def test_bad_data_file_is_named(tmp_path, tiny_sd_dir, tiny_judges):
    shutil.copytree(FIXTURES, tmp_path / "data")
    (tmp_path / "data" / "shape_val.txt").unlink()
    with pytest.raises(ComatError, match="no file 'shape_val.txt'"):
        evaluate("t2i-compbench", EvalConfig(model=str(tiny_sd_dir), data=str(tmp_path / "data"), unpinned=True,
                                             judges=tiny_judges), tmp_path / "out")


def test_worker_processes_give_the_scores_of_one_process(tiny_sd_dir, tiny_judges, tmp_path, monkeypatch):
    from comat.evaluation import registry

    real_load = registry.load_protocol
    fast = {"sampler": {"steps": 2}}
    monkeypatch.setattr("comat.evaluation.runner.load_protocol", lambda n, w, o=None: real_load(n, w, {**(o or {}), **fast}))
    runs = {}
    for processes in (1, 2):
        monkeypatch.setenv("COMAT_CACHE", str(tmp_path / f"cache{processes}"))  # each run generates everything
        cfg = dataclasses.replace(_config(tiny_sd_dir, tiny_judges, unpinned=True), processes=processes, batch_size=4)
        runs[processes] = evaluate("t2i-compbench", cfg, tmp_path / f"run{processes}")
    one, two = runs[1], runs[2]
    assert two["manifest"]["parallelism"]["generation"]["processes"] == 2
    assert two["manifest"]["counts"]["generated"] == one["manifest"]["counts"]["generated"] == 26
    assert two["aggregate"]["scores"] == one["aggregate"]["scores"]
    strip = lambda rs: [{k: v for k, v in r.items() if k != "image"} for r in rs]  # noqa: E731 (paths differ by cache)
    assert strip(read_jsonl(two["files"]["samples"])) == strip(read_jsonl(one["files"]["samples"]))
