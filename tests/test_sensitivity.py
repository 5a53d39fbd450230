"""Captioner sensitivity (paper Table 7): the corruptions, the score S, the table, the run on a tiny BLIP."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from comat.core.errors import ComatError
from comat.core.results import csv_table, markdown_table, read_jsonl
from comat.evaluation.runner import EvalConfig, evaluate
from comat_benchmarks.sensitivity import (
    KINDS,
    Item,
    SpacyCorruptions,
    ToyCorruptions,
    aggregate,
    corruptions,
    measure,
    read_pairs,
    resolve_captioner,
    sensitivity_score,
    table_rows,
)


def _pick_all(corrupt, caption: str, kind: str, draws: int = 30) -> set:
    return {corrupt(caption, kind, np.random.default_rng(seed)) for seed in range(draws)}


# --- the score ------------------------------------------------------------------------------------------------


class FakeCaptioner:
    """log p(text | image) from a table; records the calls."""

    def __init__(self, table: dict[str, float]):
        self.table = table
        self.calls: list[tuple[tuple[int, ...], list[str], str, str]] = []

    def log_prob(self, images: torch.Tensor, texts: list[str], *, prefix: str, reduction: str) -> torch.Tensor:
        self.calls.append((tuple(images.shape), list(texts), prefix, reduction))
        return torch.tensor([self.table[t] for t in texts])


def test_score_of_one_triple():
    assert sensitivity_score(-10.0, -12.0) == pytest.approx(0.2)
    assert sensitivity_score(-8.0, -6.0) == pytest.approx(-0.25)  # the corrupted caption is preferred
    assert math.isnan(sensitivity_score(0.0, -1.0))


def test_hand_computed_case_per_kind_and_overall():
    captions = ["a red circle and a blue square", "a red circle on the left of a blue square", "a green cross"]
    table = {
        "a red circle and a blue square": -10.0,
        "a blue circle and a red square": -12.0,  # attribute: S = 2 / 10 = 0.2
        "a red circle on the left of a blue square": -20.0,
        "a blue circle on the left of a red square": -25.0,  # attribute: S = 5 / 20 = 0.25
        "a blue square on the left of a red circle": -30.0,  # relation: S = 10 / 20 = 0.5
        "a green cross": -4.0,
    }
    # Noun replacement: every shape the test set does not use in the caption; give each a known value.
    corrupt = ToyCorruptions(captions)
    assert corrupt.nouns == ["circle", "cross", "square"]
    for caption, value in [("a red circle and a blue square", -11.0), ("a red circle on the left of a blue square", -22.0),
                           ("a green cross", -5.0)]:
        for text in _pick_all(corrupt, caption, "noun") - {None}:
            table[text] = value  # S = 0.1, 0.1, 0.25
    items = [Item(f"i{k}", c, f"img{k}", pixels=np.zeros((8, 8, 3), np.uint8)) for k, c in enumerate(captions)]
    captioner = FakeCaptioner(table)
    records, skipped = measure(captioner, items, corrupt, seed=0, prefix="a photography of ", batch_size=4)
    assert dict(skipped) == {"attribute": 1, "relation": 2, "noun": 0}
    by = {(r["id"], r["kind"]): r["score"] for r in records}
    assert by == pytest.approx({("i0", "attribute"): 0.2, ("i0", "noun"): 0.1, ("i1", "attribute"): 0.25,
                                ("i1", "relation"): 0.5, ("i1", "noun"): 0.1, ("i2", "noun"): 0.25})
    agg = aggregate(records, skipped, len(items))
    assert agg["per_kind"]["attribute"]["S"] == pytest.approx(0.225)
    assert agg["per_kind"]["relation"] == {"S": pytest.approx(0.5), "triples": 1, "skipped": 2, "prefers_true": 1.0}
    assert agg["per_kind"]["noun"]["S"] == pytest.approx(0.15)
    assert agg["S"] == pytest.approx((0.2 + 0.1 + 0.25 + 0.5 + 0.1 + 0.25) / 6)  # mean over triples, not over kinds
    assert agg["triples"] == 6 and agg["items"] == 3
    # Summed log p after the training prefix; each image's true caption scored once.
    assert {(prefix, reduction) for _, _, prefix, reduction in captioner.calls} == {("a photography of ", "sum")}
    assert sum(t.count("a green cross") for _, t, _, _ in captioner.calls) == 1


def test_batches_hold_one_image_size_and_scores_map_back():
    captions = ["a red circle and a blue square", "a blue circle and a red square"]
    table = {captions[0]: -10.0, captions[1]: -20.0, "a red square and a blue circle": -1.0}
    items = [Item("small", captions[0], "a", pixels=np.zeros((8, 8, 3), np.uint8)),
             Item("large", captions[1], "b", pixels=np.zeros((16, 16, 3), np.uint8))]
    swap_only = lambda caption, kind, rng: {captions[0]: captions[1], captions[1]: captions[0]}[caption] \
        if kind == "attribute" else None  # noqa: E731
    captioner = FakeCaptioner(table)
    records, _ = measure(captioner, items, swap_only, batch_size=3)
    assert [shape for shape, *_ in captioner.calls] == [(2, 3, 8, 8), (2, 3, 16, 16)]
    assert [(r["id"], r["log_p"], r["log_p_corrupted"]) for r in records] == [("small", -10.0, -20.0), ("large", -20.0, -10.0)]


# --- corruptions ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def spacy_corruptions():
    captions = ["a red car and a blue bench", "a cat on the left of a dog", "A man riding a horse.",
                "a dog next to a cat", "an owl", "two dogs playing with a ball", "The man rides a brown horse"]
    return SpacyCorruptions(captions)


def test_attribute_swap_on_parsed_captions(spacy_corruptions):
    c = spacy_corruptions
    assert _pick_all(c, "a red car and a blue bench", "attribute") == {"a blue car and a red bench"}
    assert _pick_all(c, "a red and blue car and a green bench", "attribute") == {"a green car and a red and blue bench"}
    assert _pick_all(c, "the car is red and the bench is blue", "attribute") == {"the car is blue and the bench is red"}
    # Nothing to swap: one noun without a partner, the same attribute, the same noun.
    for caption in ["a red car", "a red car and a bench", "a red car and a red bench", "a red car and a blue car"]:
        assert c(caption, "attribute", np.random.default_rng(0)) is None, caption


def test_relation_swap_on_parsed_captions(spacy_corruptions):
    c = spacy_corruptions
    assert _pick_all(c, "a cat on the left of a dog", "relation") == {"a dog on the left of a cat"}
    assert _pick_all(c, "A man riding a horse.", "relation") == {"A horse riding a man."}
    assert _pick_all(c, "The man rides a brown horse", "relation") == {"A brown horse rides the man"}
    assert _pick_all(c, "two dogs playing with a ball", "relation") == {"a ball playing with two dogs"}
    # Symmetric relations and plain conjunctions have no subject/object to swap.
    assert c("a dog next to a cat", "relation", np.random.default_rng(0)) is None
    assert c("a red car and a blue bench", "relation", np.random.default_rng(0)) is None


def test_noun_replacement_uses_the_test_set_vocabulary(spacy_corruptions):
    c = spacy_corruptions
    assert c.vocab[False] == ["ball", "bench", "car", "cat", "dog", "horse", "man", "owl"]
    assert c.vocab[True] == ["dogs"]
    got = _pick_all(c, "an owl", "noun", 60)
    assert got == {f"a {w}" for w in ["ball", "bench", "car", "cat", "dog", "horse", "man"]}  # "an" follows the noun
    got = _pick_all(c, "a red car and a blue bench", "noun", 60)
    assert "a red owl and a blue bench" in got and "a red car and a blue dog" in got
    assert all(r.count("car") + r.count("bench") == 1 for r in got)  # exactly one noun replaced
    # Plural nouns need a plural replacement: the only one is "dogs", already there.
    assert c("two dogs", "noun", np.random.default_rng(0)) is None


def test_toy_corruptions_on_the_grammar():
    c = ToyCorruptions(["a red circle and a blue square", "a green triangle"])
    assert _pick_all(c, "a red circle and a blue square", "attribute") == {"a blue circle and a red square"}
    assert _pick_all(c, "a big striped red circle and a blue square", "attribute") == {"a blue circle and a big striped red square"}
    assert _pick_all(c, "a red circle on the left of a blue square", "relation") == {"a blue square on the left of a red circle"}
    assert _pick_all(c, "a red circle next to a blue square", "relation") == {None}  # symmetric
    assert _pick_all(c, "a green triangle", "noun") == {"a green circle", "a green square"}
    assert _pick_all(c, "an orange circle", "noun") == {"an orange square", "an orange triangle"}
    assert _pick_all(c, "two red circles and a blue square", "attribute") == {"two blue circles and a red square"}


def test_captions_without_a_corruption_are_skipped_and_counted():
    captions = ["a red circle", "a red circle and a blue square", "a red circle next to a blue square",
                "a red circle and a red square"]
    items = [Item(str(k), c, "") for k, c in enumerate(captions)]
    found, skipped = corruptions(items, ToyCorruptions(captions + ["a green triangle"]), seed=0)
    assert dict(skipped) == {"attribute": 2, "relation": 4, "noun": 0}
    assert [[k for k, _ in f] for f in found] == [["noun"], ["attribute", "noun"], ["attribute", "noun"], ["noun"]]


# --- table, data, names ---------------------------------------------------------------------------------------


def test_table_has_the_paper_rows_beside_the_measured_one():
    agg = {"S": 0.123, "triples": 7, "per_kind": {k: {"S": v} for k, v in zip(KINDS, (0.1, 0.2, 0.3))}}
    rows = table_rows("toy/blip", 1_234_567, agg)
    md = markdown_table(rows)
    for line in ["| paper Table 7 | BLIP | 469M | 0.1987 |", "| paper Table 7 | GIT | 394M | 0.1728 |",
                 "| paper Table 7 | LLaVA | 7.2B | 0.1483 |", "| measured | toy/blip | 1.2M | 0.1230 | 0.1000 | 0.2000 | 0.3000 | 7 |"]:
        assert line in md
    assert md.splitlines()[0] == "| source | captioner | parameters | S | S attribute | S relation | S noun | triples |"
    assert "paper Table 7,BLIP,469M,0.1987" in csv_table(rows)


def test_jsonl_line_without_image_names_file_and_line(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"image": "a.png", "caption": "a red car"}\n\n{"caption": "a blue bench"}\n')
    with pytest.raises(ComatError) as e:
        read_pairs(data)
    message = str(e.value)
    assert f"{data}, line 3" in message and '"image"' in message and "\n" not in message
    data.write_text('{"image": "b.png", "caption": "a red car"}\n')
    with pytest.raises(ComatError, match="line 1: image 'b.png' not found"):
        read_pairs(data)
    data.write_text('["a.png", "a red car"]\n')
    with pytest.raises(ComatError, match="line 1: a JSON list, not an object"):
        read_pairs(data)
    data.write_text('{"image": "a.png", "caption": "a red car"}\n{"image": "bad.png", "caption": "a dog"}\n')
    (tmp_path / "bad.png").write_text("not an image")
    good, bad = read_pairs(data)
    assert (good.id, good.image, good.caption, good.array().shape) == ("line1", str(tmp_path / "a.png"), "a red car", (8, 8, 3))
    with pytest.raises(ComatError, match="bad.png \\(line2 of the data file\\) is not a readable image"):
        bad.array()


def _cli(monkeypatch, *args: str) -> int:
    from comat.cli import main

    monkeypatch.setattr(sys, "argv", ["comat", "sensitivity", *args])
    with pytest.raises(SystemExit) as e:
        main()
    return e.value.code


def test_cli_bad_input_is_one_line(tmp_path, monkeypatch, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"caption": "a red car"}\n')
    assert _cli(monkeypatch, "--data", str(data), "--out", str(tmp_path / "out")) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "pairs.jsonl, line 1" in lines[0]


@pytest.fixture(scope="module")
def tiny_blip_dir(tmp_path_factory):
    from comat.toy.recipes_text import TOY_WORDS
    from tests.tiny import save_tiny_blip

    return save_tiny_blip(tmp_path_factory.mktemp("tiny-blip"), TOY_WORDS + ["car", "bench", "cat", "dog"])


def test_captioner_names(tiny_blip_dir):
    assert resolve_captioner(None, None, real_data=False)[1] == "toy/blip"
    assert resolve_captioner(None, None, real_data=True) == ("blip", "Salesforce/blip-image-captioning-large")
    assert resolve_captioner("git", None, real_data=True) == ("git", "microsoft/git-large-coco")
    assert resolve_captioner("llava", "some/llava", real_data=True) == ("llava", "some/llava")
    assert resolve_captioner("git", "toy", real_data=False) == ("git", "toy/git")
    assert resolve_captioner(None, str(tiny_blip_dir), real_data=False) == ("blip", str(tiny_blip_dir))
    with pytest.raises(ComatError, match="unknown captioner 'clip'"):
        resolve_captioner("clip", None, real_data=False)
    with pytest.raises(ComatError, match="drop --captioner-model"):
        resolve_captioner("toy/blip", "x/y", real_data=False)


def test_end_to_end_on_a_tiny_blip_in_the_toy_world(tiny_blip_dir, tmp_path):
    from comat.models.captioners import load_captioner
    from comat.toy.world import render, sample_scene

    cfg = EvalConfig(world="toy", seed=3, device="cpu",
                     options={"captioner": "blip", "captioner_model": str(tiny_blip_dir), "n": 10})
    result = evaluate("sensitivity", cfg, tmp_path / "out")
    files = result["files"]
    assert {p.name for p in files.values()} == {"sensitivity.samples.jsonl", "sensitivity.json", "sensitivity.md",
                                                "sensitivity.csv", "manifest.json"}
    records = read_jsonl(files["samples"])
    agg = json.loads(files["aggregate"].read_text())
    assert len(records) == agg["triples"] > 10
    assert {r["kind"] for r in records} == set(KINDS)
    for r in records:
        assert r["score"] == pytest.approx((r["log_p"] - r["log_p_corrupted"]) / abs(r["log_p"]))
    assert agg["S"] == pytest.approx(np.mean([r["score"] for r in records]))
    assert agg["items"] == 10 and sum(v["skipped"] for v in agg["per_kind"].values()) == 3 * 10 - len(records)
    # log p is the captioner's own summed log-likelihood after the training prefix, on the toy eval render.
    first = records[0]
    scene = sample_scene("single", np.random.default_rng([3, 0x5E45]), "eval")
    assert scene.prompt == first["caption"]
    image = torch.from_numpy(render(scene).image).permute(2, 0, 1)[None].float() / 255
    direct = load_captioner("blip", tiny_blip_dir).log_prob(image, [first["caption"]], prefix="a photography of ")
    assert first["log_p"] == pytest.approx(float(direct), abs=1e-4)
    manifest = json.loads(files["manifest"].read_text())
    assert manifest["captioner"]["kind"] == "blip" and len(manifest["captioner"]["fingerprint"]) == 64
    assert manifest["captioner"]["parameters"] == load_captioner("blip", tiny_blip_dir).num_parameters()
    assert manifest["data"]["scenes"] == 10 and manifest["protocol"]["seed"] == 3
    md = files["markdown"].read_text()
    assert "| paper Table 7 | BLIP | 469M | 0.1987 |" in md and "Protocol: " in md and "skipped" in md


def test_end_to_end_on_real_format_data(tiny_blip_dir, tmp_path):
    for name, color in [("a.png", (200, 10, 10)), ("b.png", (10, 10, 200))]:
        Image.new("RGB", (40, 30), color).save(tmp_path / name)
    Image.new("RGB", (20, 20)).save(tmp_path / "c.png")
    lines = [{"image": "a.png", "caption": "a red car and a blue bench"},
             {"image": "b.png", "caption": "a cat on the left of a dog"},
             {"image": "c.png", "caption": "a dog"}]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in lines))
    cfg = EvalConfig(world="real", data=str(data), device="cpu", options={"captioner_model": str(tiny_blip_dir)})
    result = evaluate("sensitivity", cfg, tmp_path / "out")
    got = {(r["id"], r["kind"]): r["corrupted"] for r in read_jsonl(result["files"]["samples"])}
    assert got[("line1", "attribute")] == "a blue car and a red bench"
    assert got[("line2", "relation")] == "a dog on the left of a cat"
    assert ("line3", "attribute") not in got and got[("line3", "noun")] in {"a car", "a bench", "a cat"}
    assert result["aggregate"]["per_kind"]["relation"]["skipped"] == 2
    assert result["manifest"]["data"]["pairs"] == 3 and len(result["manifest"]["data"]["sha256"]) == 64


def test_cli_prints_the_table_with_its_protocol(tiny_blip_dir, tmp_path, monkeypatch, capsys):
    code = _cli(monkeypatch, "--captioner", "blip", "--captioner-model", str(tiny_blip_dir), "--n", "4",
                "--set", "batch_size=2", "--out", str(tmp_path / "out"), "--device", "cpu")
    assert code in (0, None)
    printed = capsys.readouterr().err
    assert "| paper Table 7 | GIT | 394M | 0.1728 |" in printed and "| measured | blip (" in printed
    assert "Protocol: benchmark=captioner sensitivity" in printed and "skipped" in printed
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["config"]["batch_size"] == 2
