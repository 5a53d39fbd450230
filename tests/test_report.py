"""`comat report` on a run directory built here in the real formats: an ablation matrix written by comat.experiments.ablate's own
table writer, a demo laid out as comat.experiments.demo writes it, evaluations written by comat.core.results.write_run, training logs
as comat.train.trainer's _Log writes them, and tiny solid-colour PNGs standing in for the image cache."""

import json
import re
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from comat.cli import app
from comat.core.errors import ComatError
from comat.core.results import write_run
from comat.experiments.ablate import AblateConfig, load_matrix, write_table
from comat.experiments.report import bar_series, pair_images, write_report
from tests.test_cli import run_cli

BENCH = "t2i-compbench"
PROMPTS = {"color": ["a red circle", "a blue square and a green triangle beside a yellow circle", "a pink circle"],
           "shape": ["a circle", "a square"]}
IDS = [(cat, f"{cat}_{i}", p) for cat, prompts in PROMPTS.items() for i, p in enumerate(prompts)]
MATRIX = """title: A two-cell matrix
benchmark: t2i-compbench
metrics: [color, shape]
paper_model: CoMat-SDXL
cells:
  base:
    train: null
    paper: {color: 0.5, shape: 0.4}
  +CA:
    train: {attribute_concentration.enabled: false}
    paper: {color: 0.7, shape: 0.5}
"""


def colour(model: str, k: int, seed: int) -> tuple[int, int, int]:
    """A distinct solid colour per (model, prompt, seed): a grid pixel says which image was pasted there."""
    return 20 + 40 * k, 60 + 100 * seed, 30 if model == "base" else 220


def image(cache: Path, model: str, k: int, seed: int) -> Path:
    path = cache / model / f"{k}_{seed}.png"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16), colour(model, k, seed)).save(path)
    return path


def write_eval(directory: Path, cache: Path, lora: str | None) -> list[dict]:
    """One evaluation as comat.evaluation.runner writes it. The fine-tuned file lists seed 1 before seed 0 and one prompt
    the base never saw, so pairing must go by (id, seed), not by position."""
    model = "base" if lora is None else "tuned"
    seeds = (0, 1) if lora is None else (1, 0)
    records = [{"id": i, "category": cat, "prompt": p, "seed": s, "image": str(image(cache, model, k, s)),
                "score": 0.5 + 0.1 * s} for k, (cat, i, p) in enumerate(IDS) for s in seeds]
    if lora is not None:
        records.append({"id": "color_9", "category": "color", "prompt": "a grey square", "seed": 0,
                        "image": str(image(cache, model, 9, 0)), "score": 0.1})
    scores = {cat: 0.6 if lora else 0.5 for cat in PROMPTS}
    write_run(directory, BENCH, records=records, aggregate={"scores": scores},
              rows=[{"category": c, "score": v, "images": 6, "prompts": 3} for c, v in scores.items()],
              manifest={"protocol": {"benchmark": BENCH, "seeds": 2},
                        "model": {"model": "toy/t2i", "lora_sha256": None if lora is None else "ab" * 32}},
              title=f"{BENCH} (toy world, partial)")
    return records


def write_log(train_dir: Path, steps: int, offset: float) -> None:
    """comat.train.trainer._Log's format: step, then every logged term, then the step time."""
    train_dir.mkdir(parents=True, exist_ok=True)
    lines = ["step,i2t,ac_pos,loss,sec"] + [f"{s},{2 - s * 0.1 + offset:.6g},{0.5 + offset:.6g},{2.5 - s * 0.1:.6g},0.3"
                                            for s in range(1, steps + 1)]
    (train_dir / "log.csv").write_text("\n".join(lines) + "\n")


@pytest.fixture
def run(tmp_path: Path) -> Path:
    root, cache = tmp_path / "run", tmp_path / "cache"
    # the demo: train/, base/, comat/ and its comparison table
    write_log(root / "demo" / "train", 12, 0.0)
    write_eval(root / "demo" / "base", cache, None)
    write_eval(root / "demo" / "comat", cache, "demo/train/lora")
    rows = [{"category": c, "base": 0.5, "comat": 0.6, "delta": 0.1} for c in PROMPTS]
    write_run(root / "demo", "demo", records=[], aggregate={}, rows=rows, manifest={"protocol": {"benchmark": BENCH}},
              title="CoMat on the toy world: toy T2I-CompBench, base vs fine-tuned")
    # an ablation: the base cell (one seed) and +CA over two seeds, then comat.experiments.ablate's own table writer. Seed 0
    # trained in its cell, seed 1 in the run's shared trained/ (as comat.experiments.ablate.train_shared does), its cell.json
    # naming the LoRA by the path it had where the command ran (tmp_path).
    (tmp_path / "mini.yaml").write_text(MATRIX)
    matrix = load_matrix(str(tmp_path / "mini.yaml"))
    for cell, seed in (("base", 0), ("+CA", 0), ("+CA", 1)):
        cell_dir = root / "mini" / "cells" / ("base" if cell == "base" else "ca") / f"seed{seed}"
        train_dir = cell_dir / "train" if seed == 0 else root / "trained" / "0123abcd"
        lora = None if cell == "base" else str(train_dir.relative_to(tmp_path) / "lora")
        if lora:
            write_log(train_dir, 5, 0.1 * seed)
        write_eval(cell_dir / "eval", cache, lora)
        metrics = {"color": 0.5 + (0 if lora is None else 0.1 + 0.02 * seed), "shape": 0.4}
        (cell_dir / "cell.json").write_text(json.dumps({
            "status": "done", "cell": cell, "seed": seed, "metrics": metrics, "lora": lora,
            "manifest": str(cell_dir / "eval" / "manifest.json"), "protocol": {"benchmark": BENCH}}))
    write_table(matrix, AblateConfig(seeds=2), root / "mini")
    return root


def links(page: str) -> list[str]:
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", page) if not re.match(r"^[a-z]+:", t)]


def test_page_gathers_every_table_curve_and_grid(run, tmp_path):
    out = tmp_path / "elsewhere"
    result = write_report(run, out)
    page = (out / "report.md").read_text()
    tables = sorted(str(p.relative_to(run)) for p in run.rglob("*.md"))
    assert sorted(str(p.relative_to(run)) for p in result["tables"]) == tables and len(tables) == 7
    for table in tables:
        assert table in page, table
    # the two summaries are inlined with their bars; the five evaluations are folded under them
    assert "### A two-cell matrix" in page and "### CoMat on the toy world" in page
    assert page.count("<details>") == 5 and "+CA: change against base" in page
    names = sorted(p.name for p in result["figures"])
    assert names == ["bars-demo.png", "bars-mini.png", "curves-demo.png", "curves-mini.png",
                     "grid-demo-comat-t2i-compbench.png", "grid-mini-cells-ca-seed0-eval-t2i-compbench.png",
                     "grid-mini-cells-ca-seed1-eval-t2i-compbench.png"]
    for path in result["figures"]:
        with Image.open(path) as im:
            im.verify()
            assert im.format == "PNG"
        assert f"({path.relative_to(out).as_posix()})" in page
    # each fine-tuned evaluation is set beside the nearest base of its benchmark
    assert "### +CA seed 1 vs base seed 0 (t2i-compbench)" in page and "### demo/comat vs demo/base" in page
    # the shared training run is drawn with the matrix whose cell it trained, labelled by cell and seed
    assert "[+CA seed 1](../run/trained/0123abcd/log.csv)" in page and "curves-trained" not in page
    assert "Missing images" not in page and "Notes" not in page
    for target in links(page):  # relative links survive the move to another directory
        assert (out / target).is_file(), target


def test_grid_pairs_images_by_prompt_id_and_seed(run):
    write_report(run)
    grid = Image.open(run / "figures" / "grid-demo-comat-t2i-compbench.png").convert("RGB")
    # 16-px images become 128-px tiles (x8). Blocks color (3 pairs) and shape (2): width = 2*8 margin +
    # 3*(2*128 + 4) + 2*12 gutters = 820; height = 38 header + 2*(21 label + 128 tile + 3*15 caption) + 8 = 434.
    assert grid.size == (820, 434)
    y = 38 + 21 + 64  # the middle of the first row of tiles
    for k, x in enumerate((8, 8 + 272, 8 + 2 * 272)):  # the pairs of the color block, in the tuned file's order
        # the tuned file lists seed 1 first: both halves show seed 1, the base's own first image (seed 0) is not used
        assert grid.getpixel((x + 64, y)) == colour("base", k, 1)
        assert grid.getpixel((x + 128 + 4 + 64, y)) == colour("tuned", k, 1)
    y2 = y + 194
    assert grid.getpixel((8 + 64, y2)) == colour("base", 3, 1) and grid.getpixel((8 + 2 * 272 + 64, y2)) == (255,) * 3


def test_pair_images_keys_on_id_and_seed():
    def rec(i, s, cat="color", img=""):
        return {"id": i, "seed": s, "category": cat, "prompt": f"p{i}", "image": img}

    base = [rec("a", 0, img="a0"), rec("a", 1, img="a1"), rec("b", 0, img="b0"), rec("c", 0, cat="shape", img="c0")]
    tuned = [rec("x", 0, img="X"), rec("a", 1, img="A1"), rec("a", 0, img="A0"), rec("b", 2, img="B2"),
             rec("b", 0, img="B0"), rec("c", 0, cat="shape", img="C0")]
    blocks = pair_images(base, tuned)
    assert {c: [(p.id, p.seed, p.base, p.tuned) for p in ps] for c, ps in blocks.items()} == {
        "color": [("a", 1, "a1", "A1"), ("b", 0, "b0", "B0")], "shape": [("c", 0, "c0", "C0")]}
    many = [rec(str(i), 0, img=str(i)) for i in range(12)]
    assert [p.id for p in pair_images(many, many)["color"]] == [str(i) for i in range(8)]


def test_bar_series_reads_both_table_shapes(run):
    categories, series, errors = bar_series(run / "mini" / "mini.csv")  # a row per cell (measured rows only)
    assert categories == ["color", "shape"] and list(series) == ["base", "+CA"]
    assert series["+CA"] == pytest.approx([0.61, 0.4]) and errors["+CA"] == pytest.approx([0.0141421, 0.0], abs=1e-6)
    categories, series, errors = bar_series(run / "demo" / "demo.csv")  # a row per category, delta is no model
    assert categories == ["color", "shape"] and series == {"base": [0.5, 0.5], "comat": [0.6, 0.6]} and not errors


def test_missing_image_is_reported_not_fatal(run):
    lost = Path(json.loads((run / "demo" / "base" / f"{BENCH}.samples.jsonl").read_text().splitlines()[1])["image"])
    lost.unlink()  # color_0 seed 1 of the base model: the cache was cleared
    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert "1 images are no longer in the image cache" in result.output
    page = (run / "report.md").read_text()
    assert "## Missing images" in page and f"`{lost}`" in page and "1 images missing (grey)" in page
    grid = Image.open(run / "figures" / "grid-demo-comat-t2i-compbench.png").convert("RGB")
    assert grid.getpixel((8 + 64, 38 + 21 + 64)) == (200, 200, 200)  # the placeholder
    assert grid.getpixel((8 + 132 + 64, 38 + 21 + 64)) == colour("tuned", 0, 1)  # its fine-tuned half is still there


def test_figures_are_deterministic_and_stale_ones_go(run):
    first = {p.name: p.read_bytes() for p in write_report(run)["figures"]}
    (run / "figures" / "grid-old.png").write_bytes(b"stale")
    (run / "figures" / "notes.png").write_bytes(b"not ours")
    second = {p.name: p.read_bytes() for p in write_report(run)["figures"]}
    assert first == second
    assert not (run / "figures" / "grid-old.png").exists() and (run / "figures" / "notes.png").exists()


def test_cli_writes_the_report(run):
    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert "7 tables" in result.output and "7 figures" in result.output
    assert (run / "report.md").read_text().startswith("# Report: run")


def test_bad_input_is_one_line(tmp_path):
    with pytest.raises(ComatError, match="does not exist"):
        write_report(tmp_path / "nope")
    write_log(tmp_path / "empty" / "train", 3, 0.0)
    result = run_cli("report", str(tmp_path / "empty"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error:") and "holds no tables" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_bad_training_log_names_the_file(run):
    log = run / "demo" / "train" / "log.csv"
    log.write_text("i2t,loss\n1,2\n")
    with pytest.raises(ComatError, match=r"demo/train/log.csv: no 'step' column"):
        write_report(run)


def test_bad_evaluation_record_names_file_and_record(run):
    path = run / "demo" / "comat" / f"{BENCH}.samples.jsonl"
    lines = path.read_text().splitlines()
    lines[2] = json.dumps({k: v for k, v in json.loads(lines[2]).items() if k != "seed"})
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ComatError, match=r"demo/comat/t2i-compbench.samples.jsonl, record 3: no seed"):
        write_report(run)
