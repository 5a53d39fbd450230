"""``comat eval <benchmark>``: generate through the engine, score with the adapter, write the run's outputs."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from benchmarks.registry import Sample, benchmark_class, load_protocol
from comat.engine import GenerationEngine, ImageJob
from comat.errors import ComatError
from comat.judges.cached import Judges
from comat.results import write_run

log = logging.getLogger(__name__)


@dataclasses.dataclass
class EvalConfig:
    model: str = "toy"
    ckpt: str | None = None
    world: str | None = None  # real or toy (its prompts and judges); None: toy exactly when the model is a toy one
    data: str | None = None  # the official data file or its directory (default: download the pinned file)
    unpinned: bool = False  # accept data whose sha256 is not the pinned one (recorded)
    categories: list[str] = dataclasses.field(default_factory=list)  # empty: all
    limit: int | None = None  # at most this many prompts per category (a quick, labelled, partial run)
    images_per_prompt: int | None = None  # None: the protocol's
    seed: int | None = None  # first image seed; None: the protocol's
    batch_size: int = 8
    device: str = "auto"
    judges: dict[str, str] = dataclasses.field(default_factory=dict)  # role -> model, overriding the protocol
    options: dict[str, Any] = dataclasses.field(default_factory=dict)  # benchmark options (e.g. mode=fixed)


def world_of(model: str) -> str:
    return "toy" if str(model) == "toy" or str(model).startswith("toy/") else "real"


def select(samples: list[Sample], categories: list[str], limit: int | None) -> list[Sample]:
    known = list(dict.fromkeys(s.category for s in samples))
    unknown = [c for c in categories if c not in known]
    if unknown:
        raise ComatError(f"unknown categor{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}; "
                         f"this benchmark has {', '.join(known)}")
    chosen = [s for s in samples if not categories or s.category in categories]
    if limit is None:
        return chosen
    counts: dict[str, int] = {}
    out = []
    for s in chosen:
        counts[s.category] = counts.get(s.category, 0) + 1
        if counts[s.category] <= limit:
            out.append(s)
    return out


def evaluate(name: str, cfg: EvalConfig, out: Path) -> dict[str, Any]:
    start = time.perf_counter()
    overrides: dict[str, Any] = {}
    if cfg.judges:
        overrides["judges"] = cfg.judges
    if cfg.options:
        overrides["options"] = cfg.options
    if cfg.images_per_prompt:
        overrides["images_per_prompt"] = cfg.images_per_prompt
    if cfg.seed is not None:
        overrides["seed"] = cfg.seed
    protocol = load_protocol(name, cfg.world or world_of(cfg.model), overrides)
    bench = benchmark_class(protocol)(protocol, data=Path(cfg.data) if cfg.data else None, unpinned=cfg.unpinned)
    samples = select(bench.samples(), cfg.categories, cfg.limit)
    engine = GenerationEngine(cfg.model, ckpt=cfg.ckpt, sampler=protocol.sampler, device=cfg.device,
                              batch_size=cfg.batch_size)
    seeds = protocol.seeds()
    paths = engine.generate([ImageJob(s.prompt, seed) for s in samples for seed in seeds], progress=True)
    images = [paths[i * len(seeds) : (i + 1) * len(seeds)] for i in range(len(samples))]

    if not engine.state().is_main_process:  # scoring is cheap next to generation: the main process does it
        return {}
    judges = Judges(protocol.judges, device="cpu" if engine.device == "auto" else engine.device)
    records = bench.score(samples, images, judges)
    aggregate, rows = bench.aggregate(records)
    partial = bool(cfg.limit or cfg.categories)
    manifest = {
        "benchmark": name,
        "protocol": {**protocol.summary(), "partial": partial or None, "limit": cfg.limit,
                     "categories": ",".join(cfg.categories) or None},
        "data": bench.data_records,
        "model": engine.identity,
        "judges": judges.versions(),
        "counts": {"prompts": len(samples), "images": len(samples) * len(seeds), "generated": engine.generated,
                   "judge_answers_computed": judges.cache.computed},
        "seconds": {"generation": round(engine.generation_seconds, 2), "total": round(time.perf_counter() - start, 2)},
    }
    files = write_run(out, name, records=records, aggregate=aggregate, rows=rows, manifest=manifest,
                      title=f"{name} ({protocol.world} world{', partial' if partial else ''})",
                      notes=getattr(bench, "notes", ()))
    files.update(bench.write_outputs(out, samples, images))
    return {"aggregate": aggregate, "rows": rows, "manifest": manifest, "files": files}
