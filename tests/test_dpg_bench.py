"""DPG-Bench adapter: the dependency cascade in both modes on a CSV with upstream's quirks, grids, bad input, toy CSV.

The fixture CSV (tests/fixtures/dpg/dpg_bench.csv), in file order:

    line  item  qid  parents  L2 category
    2     0     1    0        entity - whole       <- the first row: upstream skips it
    3     0     2    1        attribute - color    <- depends on the skipped row: upstream drops item 0
    4     0     3    0        entity - whole
    5     1     1    0        entity - whole
    6     1     3    2        attribute - color    <- listed before its parent 2
    7     1     2    1        attribute - type
    8     1     4    1,5      relation - spatial   <- listed before its parent 5
    9     1     5    0        entity - whole
    10    1     6    3        attribute - texture  <- grandchild of 2 through 3
    11    C     1    0        entity - whole       (C = COCOval2014000000010363)
    12    C     2    1        attribute - color    <- always answered "Yes": not exactly "yes", so 0

Answers (everything else "yes"): item 1 crop 1: q1 "no"; crop 2: q5 "no"; crop 3: q2 and q6 "no".

Faithful, item 1, one pass in order 1, 3, 2, 4, 5, 6:
    crop 0: all 1                                                      -> 6/6
    crop 1: q1=0; q3 sees q2's raw 1 -> 1; q2 -> 0; q4 -> 0; q5 1; q6 sees q3=1 -> 1   -> 3/6
    crop 2: q5=0; q4 -> 0                                              -> 4/6
    crop 3: q2=0 -> q3 0; q6 (raw 0) 0                                 -> 3/6
    image (1 + 1/2 + 2/3 + 1/2) / 4 = 2/3; item C: 1/2 on every crop; item 0 dropped.
    DPG = (2/3 + 1/2) / 2 x 100 = 58.33.
    Categories from crop 3's raw answers of items 1 and C: entity - whole [1, 1, 1] = 100, attribute - color
    [q3 raw 1, C 0] = 50, attribute - type [0] = 0, attribute - texture [0] = 0, relation - spatial [1] = 100;
    L1: entity 100, attribute (1 + 0 + 0 + 0) / 4 = 25, relation 100.
Fixed (transitive):
    item 0: all yes -> 1. item 1: crop 1: q1=0 kills q2, q3, q4, q6 -> 1/6; crops 0, 2, 3 as above -> 1, 4/6, 3/6;
    image (6 + 1 + 4 + 3) / 24 = 7/12. item C: 1/2. DPG = (1 + 7/12 + 1/2) / 3 x 100 = 69.44.
    Categories over all crops after dependencies: entity - whole: item 0 8/8, item 1 (q1, q5) 6/8, item C 4/4
    -> 18/20 = 90; attribute - color: item 0 4/4, item 1 q3 [1,0,1,0], item C 0/4 -> 6/12 = 50; type 2/4 = 50;
    texture 2/4 = 50; relation 2/4 = 50. L1: entity 90, attribute 10/20 = 50, relation 50.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from comat.core.errors import ComatError
from comat.evaluation.registry import load_protocol
from comat_benchmarks.dpg_bench import COLUMNS, DpgBench, faithful_items, fixed_items, read_dpg_csv, toy_csv, toy_rows
from tests.test_tifa import FakeJudges

FIXTURES = Path(__file__).parent / "fixtures" / "dpg"
HEADER = ",".join(COLUMNS)
C = "COCOval2014000000010363"
NO = {("1", 1, "Is there a truck?"), ("1", 2, "Is there a beach?"), ("1", 3, "Is the truck a pickup truck?"),
      ("1", 3, "Is the truck's paint glossy?")}


def _bench(mode: str, **kwargs) -> DpgBench:
    return DpgBench(load_protocol("dpg-bench", "real", {"options": {"mode": mode}}), data=FIXTURES, unpinned=True,
                    **kwargs)


def _images(tmp_path: Path, samples) -> list[list[Path]]:
    """Four distinct flat-colour 8x8 PNGs per item (item k, crop j has colour (k, j, 7))."""
    out = []
    for k, s in enumerate(samples):
        paths = []
        for j in range(4):
            p = tmp_path / "images" / f"{s.id}__{j}.png"
            p.parent.mkdir(exist_ok=True)
            PIL.Image.new("RGB", (8, 8), (k, j, 7)).save(p)
            paths.append(p)
        out.append(paths)
    return out


def _judges(samples, images) -> FakeJudges:
    answers = {}
    for s, paths in zip(samples, images):
        for j, p in enumerate(paths):
            for q in ("Are there cabbages?", "Are the cabbages green?", "Is there a field?", "Is there a truck?",
                      "Is the truck red?", "Is the truck a pickup truck?", "Is the truck on the beach?",
                      "Is there a beach?", "Is the truck's paint glossy?", "Is there a cat?"):
                answers[(p.name, q)] = "no" if (s.id, j, q) in NO else "yes"
            answers[(p.name, "Is the cat gray?")] = "Yes"
    return FakeJudges(answers)


def _run(mode: str, tmp_path: Path):
    bench = _bench(mode)
    samples = bench.samples()
    images = _images(tmp_path, samples)
    records = bench.score(samples, images, _judges(samples, images))
    summary, rows = bench.aggregate(records)
    return bench, samples, images, {r["id"]: r for r in records}, summary, rows


def test_reading_the_fixture_csv():
    props, texts = read_dpg_csv((FIXTURES / "dpg_bench.csv").read_text(), "dpg_bench.csv")
    assert [p.line for p in props] == list(range(2, 13))
    assert [(p.item_id, p.qid, p.parents) for p in props[3:9]] == [
        ("1", 1, (0,)), ("1", 3, (2,)), ("1", 2, (1,)), ("1", 4, (1, 5)), ("1", 5, (0,)), ("1", 6, (3,))]
    assert props[6].category == "relation - spatial"
    assert list(texts) == ["0", "1", C] and texts["1"].startswith("An eye-catching vibrant red pickup truck")
    assert list(faithful_items(props)["0"]) == [2, 3]  # the first row is gone
    assert list(faithful_items(props)["1"]) == [1, 3, 2, 4, 5, 6]  # file order
    assert list(fixed_items(props)["0"]) == [1, 2, 3]


def test_faithful_mode_reproduces_upstream(tmp_path):
    bench, _, _, records, summary, rows = _run("faithful", tmp_path)
    assert records["0"]["score"] is None and "depends on question 1" in records["0"]["dropped"]
    assert records["1"]["crop_scores"] == pytest.approx([1, 3 / 6, 4 / 6, 3 / 6])
    assert records["1"]["score"] == pytest.approx(2 / 3)
    assert records[C]["score"] == pytest.approx(1 / 2)
    by_qid = {q["proposition_id"]: q for q in records["1"]["questions"]}
    assert by_qid[3]["scores"] == [1, 1, 1, 0]  # crop 1: saw its parent's raw "yes" before the parent was zeroed
    assert by_qid[6]["scores"] == [1, 1, 1, 0]
    assert summary["mode"] == "faithful" and summary["n_dropped"] == 1 and list(summary["dropped"]) == ["0"]
    assert summary["dpg_score"] == pytest.approx(100 * (2 / 3 + 1 / 2) / 2)
    assert summary["l2"] == pytest.approx({"attribute - color": 50, "attribute - texture": 0, "attribute - type": 0,
                                           "entity - whole": 100, "relation - spatial": 100})
    assert summary["l1"] == pytest.approx({"attribute": 25, "entity": 100, "relation": 100})
    assert rows[0] == {"metric": "DPG-Bench", "score": pytest.approx(58.3333, abs=1e-4), "n": 2, "over": "images",
                       "mode": "faithful"}
    assert any("1 images dropped" in n for n in bench.notes) and bench.notes[0].startswith("scoring mode: faithful")


def test_fixed_mode_is_transitive_reads_every_row_and_uses_all_crops(tmp_path):
    _, _, _, records, summary, rows = _run("fixed", tmp_path)
    assert records["0"]["score"] == 1.0
    assert records["1"]["crop_scores"] == pytest.approx([1, 1 / 6, 4 / 6, 3 / 6])
    assert records["1"]["score"] == pytest.approx(7 / 12)
    assert summary["n_dropped"] == 0 and summary["mode"] == "fixed"
    assert summary["dpg_score"] == pytest.approx(100 * (1 + 7 / 12 + 1 / 2) / 3)
    assert summary["l2"] == pytest.approx({"attribute - color": 50, "attribute - texture": 50, "attribute - type": 50,
                                           "entity - whole": 90, "relation - spatial": 50})
    assert summary["l1"] == pytest.approx({"attribute": 50, "entity": 90, "relation": 50})
    assert {r["metric"]: r["n"] for r in rows} == {
        "DPG-Bench": 3, "L1 attribute": 20, "L1 entity": 20, "L1 relation": 4, "L2 attribute - color": 12,
        "L2 attribute - texture": 4, "L2 attribute - type": 4, "L2 entity - whole": 20, "L2 relation - spatial": 4}
    assert all(r["mode"] == "fixed" for r in rows)


def test_prompts_come_from_the_prompt_folder_when_given(tmp_path):
    bench = _bench("fixed")
    samples = bench.samples()
    files = [FIXTURES / "prompts" / f"{i}.txt" for i in ("0", "1", C)]
    assert [s.prompt for s in samples] == [f.read_text().strip() for f in files]
    assert any(d.get("name") == "prompts/<item_id>.txt" for d in bench.data_records)
    assert {d["name"]: d["verified"] for d in bench.data_records if "verified" in d} == {"dpg_bench.csv": False}
    # the CSV alone: prompts from its text column
    alone = DpgBench(load_protocol("dpg-bench"), data=FIXTURES / "dpg_bench.csv", unpinned=True)
    assert [s.prompt for s in alone.samples()] == [s.prompt for s in samples]
    assert any("text column" in n for n in alone.notes)


def test_grids_put_image_j_at_upstream_crop_j(tmp_path):
    bench = _bench("fixed")
    samples = bench.samples()
    images = _images(tmp_path, samples)
    files = bench.write_outputs(tmp_path / "run", samples, images)
    grid = np.asarray(PIL.Image.open(files["grids"] / "1.png"))
    assert grid.shape == (16, 16, 3)
    # crop tuples: (0,0,r,r), (r,0,2r,r), (0,r,r,2r), (r,r,2r,2r)
    assert [tuple(grid[y, x]) for x, y in ((0, 0), (8, 0), (0, 8), (8, 8))] == [(1, j, 7) for j in range(4)]
    off = DpgBench(load_protocol("dpg-bench", "real", {"options": {"grids": "false"}}), data=FIXTURES, unpinned=True)
    assert off.write_outputs(tmp_path / "run2", samples, images) == {}


def test_a_later_block_of_an_item_replaces_the_earlier_one_in_faithful_mode_only():
    rows = ["x,t,,1,0,entity,whole,entity - whole (a),Is there an a?", "a,t,,1,0,entity,whole,entity - whole (a),q1?",
            "a,t,,2,1,entity,whole,entity - whole (b),q2?", "b,t,,1,0,entity,whole,entity - whole (c),q3?",
            "a,t,,3,0,entity,whole,entity - whole (d),q4?"]
    props, _ = read_dpg_csv("\n".join([HEADER, *rows]) + "\n", "inline")
    assert list(faithful_items(props)["a"]) == [3]
    assert list(fixed_items(props)["a"]) == [1, 2, 3]


# -- bad input ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, message", [
    ("item_id,text,proposition_id,tuple,question_natural_language\nx,t,1,entity - whole (a),q?\n",
     r"bad\.csv: line 1: missing column dependency; expected a CSV with the header item_id,text,keywords,"),
    (HEADER + "\nx,t,,1,0,entity,whole,entity - whole (a),q?\nx,t,,2,one,entity,whole,entity - whole (b),q?\n",
     r"bad\.csv: line 3: field 'dependency' is 'one', not an integer"),
    (HEADER + "\nx,t,,1.5,0,entity,whole,entity - whole (a),q?\n", r"line 2: field 'proposition_id' is '1.5'"),
    (HEADER + "\nx,t,,1,0\n", r"line 2: no value for tuple, question_natural_language"),
    (HEADER + "\n", r"bad\.csv: no question rows"),
])
def test_malformed_csv_is_one_line_naming_file_line_and_form(tmp_path, text, message):
    (tmp_path / "dpg_bench.csv").write_text(text)
    with pytest.raises(ComatError, match=message) as err:
        read_dpg_csv(text, "bad.csv")
    assert "\n" not in str(err.value)
    with pytest.raises(ComatError, match=message.replace(r"bad\.csv", "dpg_bench.csv")):
        DpgBench(load_protocol("dpg-bench"), data=tmp_path, unpinned=True).samples()


def test_a_dependency_cycle_is_refused_before_generation_in_fixed_mode(tmp_path):
    (tmp_path / "dpg_bench.csv").write_text(
        HEADER + "\nx,t,,1,0,entity,whole,entity - whole (a),q?\nx,t,,2,3,entity,whole,entity - whole (b),q?\n"
        "x,t,,3,2,entity,whole,entity - whole (c),q?\n")
    cycle = r"dpg_bench\.csv: line 3: item x has a dependency cycle through questions 2, 3, 2"
    with pytest.raises(ComatError, match=cycle):
        DpgBench(load_protocol("dpg-bench"), data=tmp_path, unpinned=True).samples()


def test_unknown_mode_and_too_many_images_are_refused():
    with pytest.raises(ComatError, match="mode='strict' is unknown; use --option mode=faithful or --option mode=fixed"):
        _bench("strict")
    with pytest.raises(ComatError, match="grids='maybe' is unknown; use --option grids=true or --option grids=false"):
        DpgBench(load_protocol("dpg-bench", "real", {"options": {"grids": "maybe"}}))
    with pytest.raises(ComatError, match="at most 4 images per prompt"):
        DpgBench(load_protocol("dpg-bench", "real", {"images_per_prompt": 5}))


# -- the toy world ------------------------------------------------------------------------------------------

def test_toy_csv_in_the_official_format_with_dependencies():
    from comat.toy.prompts import prompt_specs

    rows = toy_rows()
    first = [r for r in rows if r["item_id"] == "toy_complex_000"]
    assert first[0]["text"] == prompt_specs("complex", "eval")[0].text == (
        "a cross on the left of a small circle and an orange square")
    assert [(r["proposition_id"], r["dependency"], r["tuple"], r["question_natural_language"]) for r in first] == [
        ("1", "0", "entity - whole (cross)", "is there a cross?"),
        ("2", "0", "entity - whole (circle)", "is there a circle?"),
        ("3", "0", "entity - whole (square)", "is there a square?"),
        ("4", "2", "attribute - size (circle, small)", "is the circle small?"),
        ("5", "3", "attribute - color (square, orange)", "is the square orange?"),
        ("6", "1,2", "relation - spatial (cross, circle, on the left of)", "is the cross on the left of the circle?"),
    ]
    assert toy_csv() == toy_csv()  # deterministic
    props, texts = read_dpg_csv(toy_csv(), "toy")
    assert len(texts) == len(prompt_specs("complex", "eval")) and len(props) == len(rows)


@pytest.mark.parametrize("mode, dropped", [("faithful", ["toy_complex_000"]), ("fixed", [])])
def test_toy_dpg_with_a_judge_that_always_says_yes(mode, dropped, tmp_path):
    bench = DpgBench(load_protocol("dpg-bench", "toy", {"options": {"mode": mode}}))
    samples = bench.samples()[:3]
    images = [[Path(f"{s.id}__{j}.png") for j in range(4)] for s in samples]

    class Yes:
        def answer(self, paths, questions):
            return ["yes"] * len(paths)

    summary, _ = bench.aggregate(bench.score(samples, images, Yes()))
    assert list(summary["dropped"]) == dropped  # the toy CSV's first row is a parent, as upstream's
    assert summary["dpg_score"] == 100.0 and summary["n_scored"] == 3 - len(dropped)


# -- end to end ---------------------------------------------------------------------------------------------

def test_evaluate_end_to_end_on_a_tiny_pipeline(tiny_sd_dir, tmp_path, monkeypatch):
    from comat.evaluation.runner import EvalConfig, evaluate
    from tests.test_tifa import WORDS, save_tiny_vqa

    monkeypatch.setenv("COMAT_CACHE", str(tmp_path / "cache"))
    vqa = save_tiny_vqa(tmp_path / "vqa", WORDS)
    runs = {}
    for mode in ("faithful", "fixed"):
        # two prompts (item 0, whose question depends on the skipped first row, and item 1), two images each
        cfg = EvalConfig(model=str(tiny_sd_dir), data=str(FIXTURES), unpinned=True, device="cpu", limit=2,
                         images_per_prompt=2, judges={"vqa": str(vqa)}, options={"mode": mode})
        runs[mode] = evaluate("dpg-bench", cfg, tmp_path / mode)
    assert runs["fixed"]["manifest"]["counts"]["generated"] == 0  # the second mode re-used every image
    for mode in runs:
        out = tmp_path / mode
        aggregate = json.loads((out / "dpg-bench.json").read_text())
        assert aggregate["mode"] == mode and aggregate["protocol"]["mode"] == mode
        assert json.loads((out / "manifest.json").read_text())["protocol"]["mode"] == mode
        assert f"mode={mode}" in (out / "dpg-bench.md").read_text()
        records = [json.loads(line) for line in (out / "dpg-bench.samples.jsonl").read_text().splitlines()]
        for r in records:  # the cascade as recorded: a score of 1 needs the answer "yes"
            for q in r.get("questions", []):
                assert all(s == 0 or a == "yes" for a, s in zip(q["answers"], q["scores"]))
        assert sorted(p.name for p in (out / "grids").iterdir()) == ["0.png", "1.png"]
        assert len(records) == 2 and all(len(r["images"]) == 2 for r in records)
    assert list(runs["faithful"]["aggregate"]["dropped"]) == ["0"] and not runs["fixed"]["aggregate"]["dropped"]
