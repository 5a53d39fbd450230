import csv
import json

import pytest

import comat.experiments.ablate as ablate
from comat.core.errors import ComatError
from comat.experiments.ablate import (
    AblateConfig,
    Cell,
    Matrix,
    check_cells,
    load_matrix,
    matrix_names,
    run_ablation,
    table_rows,
)


def test_shipped_matrices_parse_and_every_cell_is_a_valid_toy_config():
    assert {"ca-ac", "fid", "captioner", "stop-grad", "grad-steps"} <= set(matrix_names())
    for name in matrix_names():
        m = load_matrix(name)
        assert m.base.train is None and m.metrics
        check_cells(m, "toy")
    assert load_matrix("fid").lower_is_better and load_matrix("ca-ac").cells[1].paper["color"] == 0.7455


def test_a_cell_with_an_unknown_option_is_named(tmp_path):
    (tmp_path / "bad.yaml").write_text("title: t\nbenchmark: t2i-compbench\nmetrics: [color]\ncells:\n"
                                       "  base: {train: null}\n  odd: {train: {discriminator.kindd: none}}\n")
    with pytest.raises(ComatError, match="cell 'odd'.*unknown field 'kindd'; valid fields are kind"):
        check_cells(load_matrix(str(tmp_path / "bad.yaml")), "toy")
    with pytest.raises(ComatError, match="unknown ablation matrix 'nope'; available: ca-ac"):
        load_matrix("nope")


MATRIX = Matrix("demo", "Demo", "t2i-compbench", ("color", "shape"),
                (Cell("base", None, {"color": 0.5, "shape": 0.4}), Cell("+CA", {"stop_grad": True}, {"color": 0.7, "shape": 0.3})),
                paper_model="SDXL")


def test_table_on_fixed_records():
    records = [
        {"status": "done", "cell": "base", "seed": 0, "metrics": {"color": 0.2, "shape": 0.5}},
        {"status": "done", "cell": "base", "seed": 1, "metrics": {"color": 0.4, "shape": 0.5}},
        {"status": "done", "cell": "+CA", "seed": 0, "metrics": {"color": 0.9, "shape": 0.6}},
        {"status": "failed", "cell": "+CA", "seed": 1, "error": "ValueError: boom"},
    ]
    md, rows, agreement = table_rows(MATRIX, records, "toy world")
    assert md[0] == {"row": "base", "source": "measured (toy world, 2 seeds)", "color": "0.3000 ± 0.1414", "shape": "0.5000 ± 0.0000"}
    assert md[1] == {"row": "base", "source": "paper (SDXL)", "color": "0.5000", "shape": "0.4000"}
    assert md[2]["color"] == "0.9000 ± 0.0000 (+0.6000)" and "failed: ValueError: boom" in md[2]["source"]
    assert md[3] == {"row": "+CA", "source": "paper (SDXL)", "color": "0.7000 (+0.2000)", "shape": "0.3000 (-0.1000)"}
    assert rows[2]["color_delta"] == pytest.approx(0.6) and rows[2]["failed"] == 1 and rows[2]["seeds"] == 1
    assert agreement == ["+CA: change against base (higher is better) agrees with the paper on color; differs on shape",
                         "color ordering, best first: paper +CA > base; measured +CA > base (Kendall tau +1.00)",
                         "shape ordering, best first: paper base > +CA; measured +CA > base (Kendall tau -1.00)"]
    # A change under two standard errors of the difference of the seed means is not called either way.
    records[2]["metrics"]["color"] = 0.45  # base 0.3 with SE 0.1: |delta| 0.15 < 2 SE
    assert table_rows(MATRIX, records, "toy world")[2][0] == (
        "+CA: change against base (higher is better) differs on shape; unresolved (|delta| < 2 SE) on color")


@pytest.fixture
def fake_cells(monkeypatch):
    calls = []

    def run_cell(matrix, cell, seed, cfg, cell_dir, runs, log):
        calls.append((cell.name, seed))
        if cell.name == "+CA" and seed == 1 and not getattr(run_cell, "healed", False):
            raise RuntimeError("diverged\nsecond line")
        value = 0.1 * len(calls) if cell.train is not None else 0.5
        return {"status": "done", "cell": cell.name, "seed": seed, "metrics": {"color": value, "shape": value},
                "protocol": {"benchmark": "t2i-compbench"}, "manifest": str(cell_dir / "eval" / "manifest.json")}

    monkeypatch.setattr(ablate, "run_cell", run_cell)
    monkeypatch.setattr(ablate, "load_matrix", lambda name: MATRIX)
    monkeypatch.setattr(ablate, "check_cells", lambda m, p: None)
    return calls, run_cell


def test_runner_skips_done_cells_records_failures_and_retries_them(fake_cells, tmp_path):
    calls, run_cell = fake_cells
    cfg = AblateConfig(seeds=2)
    result = run_ablation("demo", cfg, tmp_path)
    assert calls == [("base", 0), ("+CA", 0), ("base", 1), ("+CA", 1)]
    assert "failed: RuntimeError: diverged" in result["markdown"][2]["source"]
    failed = json.loads((tmp_path / "demo" / "cells" / "ca" / "seed1" / "cell.json").read_text())
    assert failed["status"] == "failed" and "second line" not in failed["error"]
    calls.clear()
    run_cell.healed = True
    result = run_ablation("demo", cfg, tmp_path)
    assert calls == [("+CA", 1)]  # only the failed cell runs again
    table = list(csv.DictReader((tmp_path / "demo" / "demo.csv").open()))
    assert [r["source"] for r in table] == ["measured", "paper", "measured", "paper"] and table[2]["seeds"] == "2"
    assert (tmp_path / "demo" / "demo.md").read_text().startswith("# Demo") and (tmp_path / "demo" / "manifest.json").is_file()


def test_killed_run_resumes_without_recomputing(fake_cells, tmp_path, monkeypatch):
    calls, run_cell = fake_cells
    run_cell.healed = True

    def killed(matrix, cell, seed, cfg, cell_dir, runs, log):
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies: nothing is written for this cell
        return run_cell(matrix, cell, seed, cfg, cell_dir, runs, log)

    monkeypatch.setattr(ablate, "run_cell", killed)
    with pytest.raises(KeyboardInterrupt):
        run_ablation("demo", AblateConfig(seeds=2), tmp_path)
    assert calls == [("base", 0), ("+CA", 0)]
    monkeypatch.setattr(ablate, "run_cell", run_cell)
    run_ablation("demo", AblateConfig(seeds=2), tmp_path)
    assert calls == [("base", 0), ("+CA", 0), ("base", 1), ("+CA", 1)]


def test_a_finished_cell_is_reused_only_for_the_same_inputs(fake_cells, tmp_path, monkeypatch):
    calls, run_cell = fake_cells
    run_cell.healed = True
    run_ablation("demo", AblateConfig(seeds=1, limit=20, steps=5), tmp_path)
    record = json.loads((tmp_path / "demo" / "cells" / "ca" / "seed0" / "cell.json").read_text())
    assert record["inputs"]["limit"] == 20 and len(record["inputs"]["training"]) == 16
    assert json.loads((tmp_path / "demo" / "cells" / "base" / "seed0" / "cell.json").read_text())["inputs"]["training"] is None
    calls.clear()
    run_ablation("demo", AblateConfig(seeds=1, limit=20, steps=5), tmp_path)
    assert calls == []
    with pytest.raises(ComatError, match=r"base/seed0/cell.json: computed with limit=20, this run asks for limit=50"):
        run_ablation("demo", AblateConfig(seeds=1, limit=50, steps=5), tmp_path)
    with pytest.raises(ComatError, match=r"ca/seed0/cell.json: computed with training=\w{16}, this run asks for training="):
        run_ablation("demo", AblateConfig(seeds=1, limit=20, steps=5, set=("lr=1e-3",)), tmp_path)
    import comat.models.fingerprint

    weights = comat.models.fingerprint.model_fingerprint("toy")
    with monkeypatch.context() as patch, pytest.raises(
            ComatError, match=rf"base/seed0/cell.json: computed with model_sha256={weights}, this run asks for "
                              r"model_sha256=retrained \(.*the base model's weights changed\)"):
        patch.setattr(comat.models.fingerprint, "model_fingerprint", lambda model: "retrained")
        run_ablation("demo", AblateConfig(seeds=1, limit=20, steps=5), tmp_path)  # the untrained cell too
    assert calls == []  # nothing was recomputed or overwritten
    del record["inputs"]  # a record from before inputs were kept is reused as it is
    (tmp_path / "demo" / "cells" / "ca" / "seed0" / "cell.json").write_text(json.dumps(record))
    run_ablation("demo", AblateConfig(seeds=1, limit=20, steps=5), tmp_path)
    assert calls == []
    ablate.write_table(MATRIX, AblateConfig(seeds=1, steps=5, set=("lr=1e-3",)), tmp_path / "demo")
    training = json.loads((tmp_path / "demo" / "manifest.json").read_text())["protocol"]["training"]
    assert training == "preset toy, steps 5, seeds 0..0, lr=1e-3"  # the table names the overrides it ran with


def test_shards_split_cells_and_the_final_run_only_assembles(fake_cells, tmp_path):
    calls, run_cell = fake_cells
    run_cell.healed = True
    assert run_ablation("demo", AblateConfig(seeds=2, shard="0/2"), tmp_path) == {}
    assert calls == [("base", 0), ("base", 1)]
    run_ablation("demo", AblateConfig(seeds=2, shard="1/2"), tmp_path)
    calls.clear()
    result = run_ablation("demo", AblateConfig(seeds=2), tmp_path)
    assert calls == [] and result["csv"][2]["seeds"] == 2
    with pytest.raises(ComatError, match="must be i/n"):
        run_ablation("demo", AblateConfig(shard="2/2"), tmp_path)


def test_cells_with_the_same_resolved_config_share_one_training_run(tmp_path, monkeypatch):
    import comat.train.trainer
    from comat.methods.comat.config import load_train_config

    trained = []

    def fake_train(cfg, out, device, log):
        trained.append(out)
        if cfg.seed == 7:
            raise KeyboardInterrupt  # killed mid-training: the run is not marked done
        (out / "lora").mkdir()
        return out / "lora"

    monkeypatch.setattr(comat.train.trainer, "train", fake_train)
    runs = tmp_path / "trained"
    full = load_train_config("toy", None, ("steps=5",))
    preset_ml = full.mixed_latent.enabled  # spelling out the preset's own value changes nothing
    same = load_train_config("toy", None, ("steps=5", f"mixed_latent.enabled={preset_ml}", "captioner.kind=blip"))
    other = load_train_config("toy", None, ("steps=5", f"mixed_latent.enabled={not preset_ml}"))
    lora = ablate.train_shared(full, runs, "cpu", print)
    assert ablate.train_shared(same, runs, "cpu", print) == lora and len(trained) == 1
    assert ablate.train_shared(other, runs, "cpu", print) != lora and len(trained) == 2
    killed = load_train_config("toy", None, ("steps=5", "seed=7"))
    with pytest.raises(KeyboardInterrupt):
        ablate.train_shared(killed, runs, "cpu", print)
    with pytest.raises(KeyboardInterrupt):
        ablate.train_shared(killed, runs, "cpu", print)
    assert trained[2] == trained[3] and len(trained) == 4  # retried in the same directory, to resume its checkpoint
