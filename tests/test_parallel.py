"""A CPU used whole: worker processes change how fast images come, never which images come."""

import pytest
import torch

from comat.core.errors import ComatError
from comat.core.runtime import configure_threads, cpu_processes
from comat.generation.engine import GenerationEngine, ImageJob, SamplerSettings

SAMPLER = SamplerSettings(steps=3, guidance=2.0, scheduler="ddim")
JOBS = [ImageJob(f"a red cube number {i}", seed=i) for i in range(6)]


def _images(model, cache, *, threads, processes):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        engine = GenerationEngine(str(model), sampler=SAMPLER, batch_size=2, device="cpu", cache=cache,
                                  processes=processes)
        paths = engine.generate(JOBS)
        return [p.read_bytes() for p in paths], engine
    finally:
        torch.set_num_threads(before)


def test_worker_processes_make_the_images_of_one_thread(tiny_sd_dir, tmp_path):
    # One thread per worker: more threads in one process can change a reduction's order and so the last bits.
    one, engine = _images(tiny_sd_dir, tmp_path / "one", threads=1, processes=1)
    assert engine.parallelism == {"processes": 1, "threads_per_process": 1}
    workers, engine = _images(tiny_sd_dir, tmp_path / "workers", threads=2, processes=2)
    assert engine.parallelism == {"processes": 2, "threads_per_process": 1} and engine.generated == len(JOBS)
    assert workers == one


def test_workers_only_start_for_work_they_can_share(tiny_sd_dir, tmp_path):
    engine = GenerationEngine(str(tiny_sd_dir), sampler=SAMPLER, batch_size=2, device="cpu", cache=tmp_path,
                              processes=4)
    assert engine.workers(1) == 1 and engine.workers(3) == 3 and engine.workers(9) == 4
    engine.generate(JOBS)  # three batches, three workers
    again = GenerationEngine(str(tiny_sd_dir), sampler=SAMPLER, batch_size=2, device="cpu", cache=tmp_path,
                             processes=4)
    again.generate(JOBS)
    assert again.generated == 0 and again.parallelism["processes"] == 1  # all cached: nothing to share


def test_thread_and_process_counts_come_from_flags_then_the_environment(monkeypatch):
    monkeypatch.setenv("COMAT_THREADS", "1")
    monkeypatch.setenv("COMAT_PROCESSES", "3")
    before = torch.get_num_threads()
    try:
        assert configure_threads(2) == 2 and torch.get_num_threads() == 2
        assert configure_threads() == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert cpu_processes(2) == 2 and cpu_processes() == 3
    monkeypatch.setenv("COMAT_PROCESSES", "zero")
    with pytest.raises(ComatError, match="COMAT_PROCESSES='zero': give a whole number of at least 1"):
        cpu_processes()
    with pytest.raises(ComatError, match="--threads=0"):
        configure_threads(0)
