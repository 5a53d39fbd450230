"""``comat eval <benchmark>``, ``comat attack`` and ``comat sensitivity``: one path from a benchmark's name to its
run directory. The protocol is resolved, the adapter selects samples and runs (by default: generate through the
engine, score with the judges), and the records, table and manifest are written the same way for every benchmark.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import torch

from comat.core.config import deep_merge
from comat.core.errors import ComatError
from comat.core.results import write_run
from comat.core.runtime import cpu_processes
from comat.evaluation.benchmark import Benchmark, Protocol, Sample
from comat.evaluation.registry import benchmark_class, load_protocol
from comat.generation.engine import GenerationEngine
from comat.judges.panel import Judges

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
    steps: int | None = None  # sampler steps; None: the protocol's (another count is a labelled, quick run)
    batch_size: int = 8
    processes: int | None = None  # CPU generation processes without a launcher; None: $COMAT_PROCESSES or every core
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


class RunContext:
    """What an adapter's :meth:`~Benchmark.run` draws on: the engine and the judges, built on first use, so a
    benchmark that generates nothing loads no pipeline."""

    def __init__(self, cfg: EvalConfig, protocol: Protocol):
        self.cfg = cfg
        self.protocol = protocol
        self._engine: GenerationEngine | None = None
        self._judges: Judges | None = None
        # Judges score on the CPU under --device auto; a benchmark whose gradients flow through a judge (the
        # prompt attack) sets the engine's device before the first use.
        self.judges_device = "cpu" if cfg.device == "auto" else cfg.device

    @property
    def engine(self) -> GenerationEngine:
        if self._engine is None:
            self._engine = GenerationEngine(self.cfg.model, ckpt=self.cfg.ckpt, sampler=self.protocol.sampler,
                                            device=self.cfg.device, batch_size=self.cfg.batch_size,
                                            processes=cpu_processes(self.cfg.processes))
        return self._engine

    @property
    def judges(self) -> Judges:
        if self._judges is None:
            self._judges = Judges(self.protocol.judges, device=self.judges_device)
        return self._judges

    @property
    def is_main_process(self) -> bool:
        return self._engine is None or self._engine.state().is_main_process

    def manifest(self) -> dict[str, Any]:
        """The model, judges, counts and times of what was used."""
        out: dict[str, Any] = {"counts": {}, "seconds": {}}
        if self._engine is not None:
            out["model"] = self._engine.identity
            out["counts"]["generated"] = self._engine.generated
            out["seconds"]["generation"] = round(self._engine.generation_seconds, 2)
            out["parallelism"] = {"generation": self._engine.parallelism}
        if self._judges is not None:
            out["judges"] = self._judges.versions()
            out.setdefault("parallelism", {})["judges"] = {"processes": 1, "threads_per_process": torch.get_num_threads()}
            out["counts"]["judge_answers_computed"] = self._judges.cache.computed
        return out


def _overrides(cfg: EvalConfig) -> dict[str, Any]:
    fields = {"judges": cfg.judges or None, "options": cfg.options or None, "images_per_prompt": cfg.images_per_prompt,
              "seed": cfg.seed, "sampler": {"steps": cfg.steps} if cfg.steps is not None else None}
    return {k: v for k, v in fields.items() if v is not None}


def evaluate(name: str, cfg: EvalConfig, out: Path) -> dict[str, Any]:
    """Run benchmark ``name`` under ``cfg``; write its samples, table and manifest into ``out``. Returns the
    aggregate, the table rows, the manifest, the notes and the written files ({} on a non-main process)."""
    start = time.perf_counter()
    protocol = load_protocol(name, cfg.world or world_of(cfg.model), _overrides(cfg))
    bench: Benchmark = benchmark_class(protocol)(protocol, data=Path(cfg.data) if cfg.data else None,
                                                 unpinned=cfg.unpinned)
    samples = select(bench.samples(), cfg.categories, cfg.limit)
    ctx = RunContext(cfg, protocol)
    records = bench.run(samples, ctx)
    if records is None:
        return {}
    aggregate, rows = bench.aggregate(records)
    partial = bool(cfg.limit or cfg.categories or bench.protocol_extra.get("partial"))
    used = ctx.manifest()
    manifest = {
        "benchmark": name,
        "protocol": {**protocol.summary(), **bench.protocol_extra, "partial": partial or None, "limit": cfg.limit,
                     "categories": ",".join(cfg.categories) or None},
        "data": bench.data_records,
        **{k: v for k, v in used.items() if k not in ("counts", "seconds")},
        "config": dataclasses.asdict(cfg),
        "counts": {"prompts": len(samples), "images": len(samples) * protocol.images_per_prompt, **used["counts"]},
        "seconds": {**used["seconds"], "total": round(time.perf_counter() - start, 2)},
    }
    manifest = deep_merge(manifest, bench.manifest_extra)
    title = getattr(bench, "title", name)
    files = write_run(out, name, records=records, aggregate=aggregate, rows=rows, manifest=manifest,
                      title=f"{title} ({protocol.world} world{', partial' if partial else ''})", notes=bench.notes)
    files.update(bench.write_outputs(out, samples, bench.images))
    return {"aggregate": aggregate, "rows": rows, "manifest": manifest, "notes": bench.notes, "files": files}
