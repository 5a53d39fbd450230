"""``comat bench engine``: the generation engine's overhead against calling the diffusers pipeline directly.

Both paths share one loaded pipeline and batch size; rounds alternate (direct, engine, direct, ...) so that load
from other processes on a shared machine hits both alike, and the figure is the ratio of the summed times.
"""

from __future__ import annotations

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
