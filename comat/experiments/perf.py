"""Speed figures, each a ratio measured within one run.

``comat bench engine``: the generation engine's overhead against calling the diffusers pipeline directly. Both
paths share one loaded pipeline and batch size; rounds alternate (direct, engine, direct, ...) so that load from
other processes on a shared machine hits both alike, and the figure is the ratio of the summed times.

``comat bench eval``: a whole evaluation at one thread, at the default threads and with worker processes.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch

from comat.generation.engine import GenerationEngine, ImageJob, SamplerSettings


def engine_overhead(model: str, *, images: int = 32, batch_size: int = 8, rounds: int = 3,
                    sampler: SamplerSettings = SamplerSettings(steps=25, guidance=6.0, scheduler="ddim"),
                    device: str = "auto") -> dict:
    direct_s = engine_s = 0.0
    with tempfile.TemporaryDirectory() as cache:
        engine = None
        for r in range(rounds):
            jobs = [ImageJob(f"a red circle and a blue square {r}-{i}", i) for i in range(images)]
            fresh = GenerationEngine(model, sampler=sampler, batch_size=batch_size, device=device, cache=Path(cache))
            if engine is not None:
                fresh._pipe = engine._pipe  # one pipeline for both paths
            engine = fresh
            pipe, size = engine.pipe, engine.resolution()
            start = time.perf_counter()
            for i in range(0, images, batch_size):
                chunk = jobs[i : i + batch_size]
                pipe([j.prompt for j in chunk], num_inference_steps=sampler.steps, guidance_scale=sampler.guidance,
                     height=size, width=size, generator=[torch.Generator("cpu").manual_seed(j.seed) for j in chunk]).images
            direct_s += time.perf_counter() - start
            start = time.perf_counter()
            engine.generate(jobs)
            engine_s += time.perf_counter() - start
    n = images * rounds
    return {"model": model, "images": n, "batch_size": batch_size, "sampler": str(sampler),
            "direct_images_per_s": n / direct_s, "engine_images_per_s": n / engine_s, "engine_over_direct": engine_s / direct_s}


def eval_throughput(benchmark: str = "t2i-compbench", *, model: str = "toy", limit: int = 20,
                    processes: int | None = None) -> dict:
    """``comat bench eval``: one evaluation (generation and scoring, each mode on a cold image and judge cache) at one
    torch thread, at the default threads, and with the default threads shared over CPU worker processes; images per
    second of each and the ratios to one thread. The modes run in turn in this process, so they see the same
    machine. The default threads are this process's (``--threads``, ``$COMAT_THREADS`` or every core)."""
    from comat.core.runtime import cpu_processes, usable_cores
    from comat.evaluation.runner import EvalConfig, evaluate

    default_threads = torch.get_num_threads()  # as the command set it
    workers = cpu_processes(processes)
    modes = {"1 thread": (1, 1), f"{default_threads} threads": (default_threads, 1),
             f"{workers} processes x {max(1, default_threads // workers)} threads": (default_threads, workers)}
    before = os.environ.get("COMAT_CACHE")
    rows, images = [], 0
    try:
        # A first, unmeasured run in one process pays what any first run pays (imports, reading the weights from
        # disk); the worker processes' own start stays in their figure, as a user pays it on every command.
        warm_up = {"warm-up": (default_threads, 1)}
        for label, (threads, procs) in {**warm_up, **modes}.items():
            torch.set_num_threads(threads)
            with tempfile.TemporaryDirectory() as cache:
                os.environ["COMAT_CACHE"] = cache
                start = time.perf_counter()
                result = evaluate(benchmark, EvalConfig(model=model, limit=1 if label in warm_up else limit,
                                                        device="cpu", processes=procs), Path(cache) / "run")
                seconds = time.perf_counter() - start
            if label in warm_up:
                continue
            images = result["manifest"]["counts"]["images"]
            rows.append({"mode": label, "seconds": f"{seconds:.1f}", "images_per_s": f"{images / seconds:.2f}",
                         "generation_s": f"{result['manifest']['seconds']['generation']:.1f}", "_s": seconds})
    finally:
        torch.set_num_threads(default_threads)
        if before is None:
            os.environ.pop("COMAT_CACHE", None)
        else:
            os.environ["COMAT_CACHE"] = before
    one_thread = rows[0]["_s"]
    for row in rows:
        row["speedup"] = f"{one_thread / row.pop('_s'):.2f}x"
    return {"benchmark": benchmark, "model": model, "limit": limit, "images": images, "cores": usable_cores(),
            "rows": rows}
