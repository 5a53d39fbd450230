"""``comat ablate <matrix>``: the paper's ablation matrices (``ablations/*.yaml``) as resumable experiments.

A matrix is data: a benchmark, its metrics, and cells, each a training-config delta (``train: null`` = the base model,
untouched) with the paper's numbers beside it. Every (cell, seed) is a directory holding its training run, its
evaluation and, once both finished, ``cell.json``; a rerun skips finished cells, resumes a half-trained one from its
checkpoint, and retries failed ones. The engine's image cache and the real-latent cache are shared, so the base
model's images are generated once for all cells and seeds; cells whose training configs resolve to the same thing
(the full model of one matrix is the default cell of another) share one training run under ``<out>/trained/``. ``--shard i/n`` runs every n-th cell (one process per GPU);
a final run without ``--shard`` only assembles the table.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import math
import re
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import yaml

from comat.core.errors import ComatError
from comat.core.io import atomic_write_json
from comat.core.results import write_run

ABLATIONS_DIR = Path(__file__).resolve().parents[2] / "ablations"
PRESETS = ("toy", "sd15", "sdxl")


@dataclasses.dataclass(frozen=True)
class Cell:
    name: str
    train: dict[str, Any] | None  # None: the base model without fine-tuning
    paper: dict[str, float]

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-") or "cell"


@dataclasses.dataclass(frozen=True)
class Matrix:
    name: str
    title: str
    benchmark: str
    metrics: tuple[str, ...]
    cells: tuple[Cell, ...]
    lower_is_better: bool = False
    paper_model: str | None = None
    eval_options: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def base(self) -> Cell:
        return self.cells[0]

    def overrides(self, cell: Cell) -> tuple[str, ...]:
        return tuple(f"{k}={_yaml_scalar(v)}" for k, v in (cell.train or {}).items())


def _yaml_scalar(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def matrix_names(directory: Path = ABLATIONS_DIR) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.yaml"))


def load_matrix(name: str, directory: Path = ABLATIONS_DIR) -> Matrix:
    path = Path(name) if name.endswith(".yaml") else directory / f"{name}.yaml"
    if not path.is_file():
        raise ComatError(f"unknown ablation matrix '{name}'; available: {', '.join(matrix_names(directory))}")
    try:
        raw = yaml.safe_load(path.read_text())
        cells = tuple(Cell(n, c.get("train"), dict(c.get("paper") or {})) for n, c in raw.pop("cells").items())
        matrix = Matrix(name=path.stem, cells=cells, metrics=tuple(raw.pop("metrics")), **raw)
    except (KeyError, TypeError, AttributeError, yaml.YAMLError) as e:
        raise ComatError(f"{path}: malformed matrix ({type(e).__name__}: {e}); it needs title, benchmark, metrics and "
                         "cells (name: {train: {...} or null, paper: {...}})") from None
    if matrix.base.train is not None:
        raise ComatError(f"{path}: the first cell is the base row and must have train: null")
    return matrix


def check_cells(matrix: Matrix, preset: str) -> None:
    """Every cell's options must exist: fail before any training, naming the cell."""
    from comat.methods.comat.config import load_train_config

    for cell in matrix.cells:
        if cell.train is None:
            continue
        try:
            load_train_config(preset, None, matrix.overrides(cell))
        except ComatError as e:
            raise ComatError(f"ablation '{matrix.name}', cell '{cell.name}': {e}") from None


@dataclasses.dataclass
class AblateConfig:
    model: str = "toy"  # the preset: toy, sd15 or sdxl
    seeds: int = 3
    first_seed: int = 0  # training seeds first_seed .. first_seed + seeds - 1
    steps: int | None = None  # training steps per cell (None: the preset's)
    limit: int | None = None  # prompts per benchmark category
    shard: str | None = None  # "i/n": run every n-th cell starting at i, skip the table
    device: str = "auto"
    processes: int | None = None  # CPU generation processes (see comat.evaluation.runner.EvalConfig)
    set: tuple[str, ...] = ()  # training overrides applied to every cell


def _shard(spec: str | None) -> tuple[int, int]:
    if not spec:
        return 0, 1
    m = re.fullmatch(r"(\d+)/(\d+)", spec)
    if not m or int(m[1]) >= int(m[2]):
        raise ComatError(f"--shard {spec!r} must be i/n with 0 <= i < n, e.g. 0/4")
    return int(m[1]), int(m[2])


def trained_run_dir(runs: Path, train_cfg: Any) -> Path:
    """Where the training run of ``train_cfg`` lives: keyed by the resolved config and the base model's weights
    (captioners and judges are keyed by their names in the config)."""
    from comat.models.fingerprint import model_fingerprint

    key = {"config": dataclasses.asdict(train_cfg), "model_sha256": model_fingerprint(train_cfg.model)}
    return runs / hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def train_shared(train_cfg: Any, runs: Path, device: str, log: Callable[[str], None]) -> Path:
    """Train once per distinct config; a shard that meets a run another shard is training waits for it."""
    from comat.train.trainer import train

    run_dir = trained_run_dir(runs, train_cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = run_dir / "done.json"
        if done.is_file():
            log(f"training run {run_dir} already done: shared")
            return Path(json.loads(done.read_text())["lora"])
        lora = train(train_cfg, run_dir, device=device, log=log)
        atomic_write_json(done, {"lora": str(lora)})
    return lora


def cell_train_config(matrix: Matrix, cell: Cell, seed: int, cfg: AblateConfig) -> Any:
    from comat.methods.comat.config import load_train_config

    sets = tuple(cfg.set) + (f"seed={seed}",) + ((f"steps={cfg.steps}",) if cfg.steps else ())
    return load_train_config(cfg.model, None, sets + matrix.overrides(cell))


def cell_inputs(matrix: Matrix, cell: Cell, seed: int, cfg: AblateConfig) -> dict:
    """What a cell's result depends on: its training run (the key of ``trained_run_dir``: resolved config and base
    weights), the base weights it is evaluated on (an untrained cell has no training key to carry them) and its
    evaluation. A finished cell is reused only for the same inputs."""
    from comat.models.fingerprint import model_fingerprint

    train_cfg = cell_train_config(matrix, cell, seed, cfg)
    return {"training": None if cell.train is None else trained_run_dir(Path(), train_cfg).name,
            "model": train_cfg.model, "model_sha256": model_fingerprint(train_cfg.model), "limit": cfg.limit,
            "eval_options": dict(matrix.eval_options)}


def _reusable(record: dict, inputs: dict, cell_dir: Path) -> bool:
    """Whether a cell.json can stand for this run's cell: done, and made from the same inputs (records written
    before inputs were kept are taken as they are)."""
    if record.get("status") != "done":
        return False
    if record.get("inputs", inputs) != inputs:
        differ = [k for k in inputs if record["inputs"].get(k) != inputs[k]]
        was = ", ".join(f"{k}={record['inputs'].get(k)}" for k in differ)
        now = ", ".join(f"{k}={inputs[k]}" for k in differ)
        raise ComatError(f"{cell_dir / 'cell.json'}: computed with {was}, this run asks for {now} (--steps, --limit, "
                         "--set or the base model's weights changed); give another --out, or remove that directory to "
                         "recompute it")
    return True


def run_cell(matrix: Matrix, cell: Cell, seed: int, cfg: AblateConfig, cell_dir: Path, runs: Path,
             log: Callable[[str], None]) -> dict:
    from comat.evaluation.runner import EvalConfig, evaluate

    start = time.perf_counter()
    train_cfg = cell_train_config(matrix, cell, seed, cfg)
    lora = None
    if cell.train is not None:
        lora = str(train_shared(train_cfg, runs, cfg.device, log))
    trained_s = time.perf_counter() - start
    result = evaluate(matrix.benchmark, EvalConfig(model=train_cfg.model, ckpt=lora, limit=cfg.limit,
                                                   device=cfg.device, processes=cfg.processes,
                                                   options=dict(matrix.eval_options)),
                      cell_dir / "eval")
    scores = result["aggregate"].get("scores", result["aggregate"])
    missing = [m for m in matrix.metrics if m not in scores]
    if missing:
        raise ComatError(f"benchmark {matrix.benchmark} reported no {', '.join(missing)}; it has {', '.join(scores)}")
    return {"status": "done", "cell": cell.name, "seed": seed, "metrics": {m: scores[m] for m in matrix.metrics},
            "lora": lora, "manifest": str(result["files"]["manifest"]), "protocol": result["manifest"]["protocol"],
            "seconds": {"train": round(trained_s, 1), "total": round(time.perf_counter() - start, 1)}}


def run_ablation(name: str, cfg: AblateConfig, out: Path, log: Callable[[str], None] = print) -> dict:
    if cfg.model not in PRESETS:
        raise ComatError(f"--model {cfg.model!r}: ablations run on a preset, one of {', '.join(PRESETS)}")
    matrix = load_matrix(name)
    check_cells(matrix, cfg.model)
    index, count = _shard(cfg.shard)
    root = out / matrix.name
    k = -1
    for seed in range(cfg.first_seed, cfg.first_seed + cfg.seeds):
        for cell in matrix.cells:
            k += 1
            if k % count != index:
                continue
            cell_dir = root / "cells" / cell.slug / f"seed{seed}"
            done = cell_dir / "cell.json"
            inputs = cell_inputs(matrix, cell, seed, cfg)
            if done.is_file() and _reusable(json.loads(done.read_text()), inputs, cell_dir):
                log(f"{matrix.name}: {cell.name} seed {seed} already done")
                continue
            log(f"{matrix.name}: {cell.name} seed {seed}")
            try:
                record = run_cell(matrix, cell, seed, cfg, cell_dir, out / "trained", log)
            except Exception as e:  # a failed cell is reported in the table; the others still run
                message = str(e).splitlines()[0] if str(e) else type(e).__name__
                record = {"status": "failed", "cell": cell.name, "seed": seed, "error": f"{type(e).__name__}: {message}",
                          "traceback": traceback.format_exc(limit=5)}
                log(f"{matrix.name}: {cell.name} seed {seed} failed: {record['error']}")
            atomic_write_json(done, {**record, "inputs": inputs})
    if count > 1:
        return {}
    return write_table(matrix, cfg, root)


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def table_rows(matrix: Matrix, records: list[dict], world: str) -> tuple[list[dict], list[dict], list[str]]:
    """Markdown rows (mean +- std and delta vs base), CSV rows (numbers), and a line per cell on whether the measured
    direction of change against the base row agrees with the paper's (``_agreement``)."""
    md, csv_rows, agreement = [], [], []
    means: dict[str, dict[str, float]] = {}
    errors: dict[str, dict[str, float]] = {}  # standard error of each mean over seeds
    for cell in matrix.cells:
        mine = [r for r in records if r["cell"] == cell.name]
        done = [r for r in mine if r["status"] == "done"]
        failed = [r for r in mine if r["status"] == "failed"]
        row_md = {"row": cell.name, "source": f"measured ({world}, {len(done)} seeds)"}
        row_csv = {"row": cell.name, "source": "measured", "seeds": len(done), "failed": len(failed)}
        if done:
            means[cell.name], errors[cell.name] = {}, {}
            for m in matrix.metrics:
                mean, std = _mean_std([r["metrics"][m] for r in done])
                means[cell.name][m], errors[cell.name][m] = mean, std / math.sqrt(len(done))
                delta = mean - means[matrix.base.name][m] if matrix.base.name in means else None
                row_md[m] = f"{mean:.4f} ± {std:.4f}" + (f" ({delta:+.4f})" if delta is not None and cell != matrix.base else "")
                row_csv.update({f"{m}": mean, f"{m}_std": std, f"{m}_delta": delta})
        if failed:
            row_md["source"] += f"; failed: {failed[0]['error']}"
            row_csv["error"] = failed[0]["error"]
        md.append(row_md)
        csv_rows.append(row_csv)
        if cell.paper:
            base_paper = matrix.base.paper
            md.append({"row": cell.name, "source": f"paper ({matrix.paper_model})",
                       **{m: f"{cell.paper[m]:.4f}" + (f" ({cell.paper[m] - base_paper[m]:+.4f})" if cell != matrix.base else "")
                          for m in matrix.metrics if m in cell.paper}})
            csv_rows.append({"row": cell.name, "source": "paper", **{m: cell.paper.get(m) for m in matrix.metrics}})
        if cell != matrix.base and cell.name in means and matrix.base.name in means and cell.paper:
            agreement.append(_agreement(matrix, cell, means, errors))
    agreement += [_ordering(matrix, m, means) for m in matrix.metrics]
    return md, csv_rows, agreement


def _ordering(matrix: Matrix, metric: str, means: dict[str, dict[str, float]]) -> str:
    """The rows ranked best first by the paper and by the measurement, and Kendall's tau between the two rankings."""
    from scipy.stats import kendalltau

    rows = [c.name for c in matrix.cells if metric in c.paper and c.name in means]
    if len(rows) < 2:
        return f"{metric}: fewer than two rows measured with a paper value; no ordering to compare"
    rank = lambda value: sorted(rows, key=value, reverse=not matrix.lower_is_better)  # noqa: E731
    paper = rank(lambda n: next(c.paper[metric] for c in matrix.cells if c.name == n))
    measured = rank(lambda n: means[n][metric])
    tau = kendalltau([paper.index(n) for n in rows], [measured.index(n) for n in rows]).statistic
    return f"{metric} ordering, best first: paper {' > '.join(paper)}; measured {' > '.join(measured)} (Kendall tau {tau:+.2f})"


def _agreement(matrix: Matrix, cell: Cell, means: dict[str, dict[str, float]],
               errors: dict[str, dict[str, float]]) -> str:
    """Per metric: the measured change against the base row agrees or differs in sign with the paper's, or is
    unresolved when it is under two standard errors of the difference of the two seed means."""
    sign = lambda x: (x > 0) - (x < 0)  # noqa: E731
    verdicts: dict[str, list[str]] = {"agrees with the paper on": [], "differs on": [], "unresolved (|delta| < 2 SE) on": []}
    for m in matrix.metrics:
        if m not in cell.paper or m not in matrix.base.paper:
            continue
        delta = means[cell.name][m] - means[matrix.base.name][m]
        if abs(delta) < 2 * math.hypot(errors[cell.name][m], errors[matrix.base.name][m]):
            verdicts["unresolved (|delta| < 2 SE) on"].append(m)
        elif sign(delta) == sign(cell.paper[m] - matrix.base.paper[m]):
            verdicts["agrees with the paper on"].append(m)
        else:
            verdicts["differs on"].append(m)
    word = "lower" if matrix.lower_is_better else "higher"
    return (f"{cell.name}: change against {matrix.base.name} ({word} is better) "
            + "; ".join(f"{k} {', '.join(v)}" for k, v in verdicts.items() if v))


def write_table(matrix: Matrix, cfg: AblateConfig, root: Path) -> dict:
    records = [json.loads(p.read_text()) for p in sorted(root.glob("cells/*/seed*/cell.json"))]
    records = [r for r in records if cfg.first_seed <= r["seed"] < cfg.first_seed + cfg.seeds]
    world = "toy world" if cfg.model == "toy" else cfg.model
    md, csv_rows, agreement = table_rows(matrix, records, world)
    protocol = next((r["protocol"] for r in records if r["status"] == "done"), {})
    training = (f"preset {cfg.model}, steps {cfg.steps or 'preset'}, seeds {cfg.first_seed}..{cfg.first_seed + cfg.seeds - 1}"
                + "".join(f", {o}" for o in cfg.set))
    manifest = {"matrix": matrix.name, "protocol": {**protocol, "training": training},
                "cells": {f"{r['cell']} seed {r['seed']}": r.get("manifest") or r.get("error") for r in records}}
    # The CSV carries numbers, not the Markdown's "mean ± std (delta)" strings.
    files = write_run(root, matrix.name, records=records, aggregate={"rows": csv_rows}, rows=md,
                      csv_rows=csv_rows, manifest=manifest, title=matrix.title, notes=agreement)
    return {"markdown": md, "csv": csv_rows, "agreement": agreement, "files": files}
