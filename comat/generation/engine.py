"""The generation engine shared by every benchmark and by training-time evaluation.

Images are cached by content: the key hashes everything that affects the pixels (model fingerprint, LoRA hash,
method and its settings, sampler settings, resolution, prompt, seed), so a second evaluation of the same checkpoint
generates nothing and two benchmarks that share prompts share images. Files are written atomically; a killed
run loses at most the batch in flight.

Sharding: the missing jobs are cut into batches first and the batches dealt round-robin to the processes, so every
batch, and therefore every image, is the same whatever the number of processes; each image's initial noise comes
from its own generator seeded with the job's seed. The processes are ``accelerate launch``'s, or on a CPU run
without a launcher, ``processes`` worker processes the engine starts itself: a small batch leaves most of a
CPU's cores idle in one process, and torch's threads scale poorly on the toy world's small tensors.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import multiprocessing
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import PIL.Image
import torch

from comat.core.errors import ComatError
from comat.core.io import atomic_write_bytes
from comat.core.runtime import cache_dir, resolve_device
from comat.models.fingerprint import model_fingerprint

log = logging.getLogger(__name__)

SCHEDULERS = ("default", "ddim", "ddpm", "pndm", "euler", "dpm++")


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    """How images are sampled. ``scheduler='default'`` keeps the pipeline's own; ``resolution=None`` is native."""

    steps: int = 50
    guidance: float = 7.5
    scheduler: str = "default"
    resolution: int | None = None
    negative_prompt: str = ""

    def __post_init__(self) -> None:
        if self.scheduler not in SCHEDULERS:
            raise ComatError(f"unknown scheduler '{self.scheduler}'; choose one of {', '.join(SCHEDULERS)}")


@dataclasses.dataclass(frozen=True)
class ImageJob:
    prompt: str
    seed: int


def _scheduler_class(name: str):
    from diffusers import (
        DDIMScheduler,
        DDPMScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        PNDMScheduler,
    )

    return {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "pndm": PNDMScheduler, "euler": EulerDiscreteScheduler,
            "dpm++": DPMSolverMultistepScheduler}[name]


def png_bytes(image: PIL.Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class GenerationEngine:
    """Cached, batched, sharded image generation for one (model, LoRA, method, sampler)."""

    def __init__(self, model: str, *, ckpt: str | Path | None = None, sampler: SamplerSettings = SamplerSettings(),
                 method: str | None = None, method_settings: dict[str, Any] | None = None, device: str = "auto",
                 batch_size: int = 8, dtype: torch.dtype = torch.float32, cache: Path | None = None,
                 processes: int = 1):
        if method is not None:
            raise ComatError(f"inference-time method '{method}' cannot be sampled yet: the engine runs plain "
                             "pipelines and LoRA checkpoints (CONFORM and Attend-and-Excite are not implemented)")
        if batch_size < 1:
            raise ComatError(f"batch size must be at least 1, got {batch_size}")
        self.model, self.ckpt, self.sampler = model, ckpt, sampler
        self.method, self.method_settings = method, dict(method_settings or {})
        self.device, self.batch_size, self.dtype = device, batch_size, dtype
        self.processes = processes  # CPU worker processes when no launcher started several
        self.cache = cache or cache_dir()  # resolved here: a worker's environment is its fork server's
        self.root = self.cache / "images"
        self._pipe = None
        self.generated = 0  # images this engine made (0 on a fully cached re-run)
        self.parallelism = {"processes": 1, "threads_per_process": torch.get_num_threads()}
        self.generation_seconds = 0.0
        from comat.models.t2i import lora_fingerprint

        self.identity = {
            "model": str(model),
            "model_sha256": model_fingerprint(model),
            "lora_sha256": lora_fingerprint(ckpt) if ckpt else None,
            "method": method,
            "method_settings": self.method_settings,
            "sampler": dataclasses.asdict(sampler),
            "dtype": str(dtype).removeprefix("torch."),
        }

    # -- keys ----------------------------------------------------------------------------------------

    def key(self, job: ImageJob) -> str:
        # By content, not by name: the same weights under another path or hub id make the same images.
        payload = {**self.identity, "model": None, "prompt": job.prompt, "seed": int(job.seed)}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def path(self, job: ImageJob) -> Path:
        k = self.key(job)
        return self.root / k[:2] / f"{k}.png"

    def missing(self, jobs: Sequence[ImageJob]) -> list[ImageJob]:
        seen, out = set(), []
        for job in jobs:
            if job not in seen and not self.path(job).is_file():
                seen.add(job)
                out.append(job)
        return out

    # -- generation ----------------------------------------------------------------------------------

    def state(self):
        """accelerate's process state (one process unless started by ``accelerate launch``)."""
        from accelerate import PartialState

        # Several CPU processes need gloo, which accelerate only picks when told the run is on the CPU.
        return PartialState(cpu=self.device == "cpu" or not torch.cuda.is_available())

    @property
    def pipe(self):
        if self._pipe is None:
            from comat.models.t2i import load_t2i

            state = self.state()
            device = state.device if self.device == "auto" and state.num_processes > 1 else resolve_device(self.device)
            pipe = load_t2i(self.model, lora=self.ckpt, device=device, dtype=self.dtype)
            if self.sampler.scheduler != "default":
                pipe.scheduler = _scheduler_class(self.sampler.scheduler).from_config(pipe.scheduler.config)
            self._pipe = pipe
        return self._pipe

    @property
    def execution_device(self) -> torch.device:
        """Where the pipeline runs (loads it)."""
        return self.pipe._execution_device

    def resolution(self) -> int:
        pipe = self.pipe
        return self.sampler.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor

    def render(self, jobs: Sequence[ImageJob]) -> list[PIL.Image.Image]:
        """One batch through the pipeline (no cache)."""
        size = self.resolution()
        generators = [torch.Generator("cpu").manual_seed(int(j.seed)) for j in jobs]
        kwargs = {"negative_prompt": [self.sampler.negative_prompt] * len(jobs)} if self.sampler.negative_prompt else {}
        return self.pipe([j.prompt for j in jobs], num_inference_steps=self.sampler.steps,
                         guidance_scale=self.sampler.guidance, height=size, width=size, generator=generators,
                         **kwargs).images

    def generate(self, jobs: Sequence[ImageJob], progress: bool = False) -> list[Path]:
        """Make sure every job's image exists in the cache; return the paths in the order of ``jobs``."""
        state = self.state()
        todo = self.missing(jobs)
        batches = [todo[i : i + self.batch_size] for i in range(0, len(todo), self.batch_size)]
        workers = self.workers(len(batches))
        threads = max(1, torch.get_num_threads() // workers)
        self.parallelism = {"processes": max(workers, state.num_processes), "threads_per_process": threads}
        if progress and todo and state.is_main_process:
            log.info("generating %d images in %d batches over %d processes", len(todo), len(batches),
                     max(workers, state.num_processes))
        if workers > 1:
            self._generate_in_workers(batches, workers, threads)
        else:
            for batch in batches[state.process_index :: state.num_processes]:
                start = time.perf_counter()
                images = self.render(batch)
                self.generation_seconds += time.perf_counter() - start
                self._save(batch, images)
                self.generated += len(batch)
        state.wait_for_everyone()
        paths = [self.path(j) for j in jobs]
        lost = [j for j, p in zip(jobs, paths) if not p.is_file()]
        if lost:
            raise ComatError(f"{len(lost)} images are missing after generation (first: {lost[0].prompt!r} seed "
                             f"{lost[0].seed}); check that {self.root} is on a filesystem all processes share")
        return paths

    def workers(self, batches: int) -> int:
        """Worker processes this engine starts for ``batches`` batches: on a CPU run without a launcher, up to
        ``processes``; otherwise none (1)."""
        if self.processes <= 1 or batches <= 1 or self.state().num_processes > 1:
            return 1
        return min(self.processes, batches) if resolve_device(self.device).type == "cpu" else 1

    def _save(self, batch: Sequence[ImageJob], images: Sequence[PIL.Image.Image]) -> None:
        for job, image in zip(batch, images):
            atomic_write_bytes(self.path(job), png_bytes(image))

    def _generate_in_workers(self, batches: list[list[ImageJob]], workers: int, threads: int) -> None:
        """This process (in a thread) and ``workers - 1`` worker processes take the batches one at a time, each at
        ``threads`` threads. This process starts at once, while the workers are still starting."""
        # Not fork: a child forked from a process whose torch thread pool has run can hang in it. A fork server
        # that imported the engine and the pipeline loaders (and never ran a thread pool) starts each worker
        # without importing torch and diffusers again.
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__, "comat.models.t2i"])
        spec = {"model": self.model, "ckpt": self.ckpt, "sampler": self.sampler, "device": self.device,
                "batch_size": self.batch_size, "dtype": self.dtype, "cache": self.cache}
        pending = collections.deque(batches)  # popleft is atomic: this process's thread and the feeder share it
        own_threads = torch.get_num_threads()
        start = time.perf_counter()

        made_here: list[int] = []
        failed_here: list[BaseException] = []

        def render_here() -> None:
            torch.set_num_threads(threads)  # OpenMP's thread count is per calling thread: set it in this one
            try:
                while pending:
                    try:
                        batch = pending.popleft()
                    except IndexError:
                        return
                    self._save(batch, self.render(batch))
                    made_here.append(len(batch))
            except BaseException as e:  # re-raised in the calling thread
                failed_here.append(e)

        with concurrent.futures.ProcessPoolExecutor(workers - 1, mp_context=context, initializer=_start_worker,
                                                    initargs=(spec, threads)) as pool:
            here = threading.Thread(target=render_here)
            here.start()
            try:  # one batch in flight per worker, handed over the moment its last one is done
                running: set[concurrent.futures.Future] = set()
                while True:
                    while pending and len(running) < workers - 1:
                        running.add(pool.submit(_render_in_worker, pending.popleft()))
                    if not running:
                        break
                    done, running = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
                    self.generated += sum(f.result() for f in done)
            finally:
                pending.clear()  # on an error, this process's thread stops after its batch
                here.join()
                torch.set_num_threads(own_threads)  # in case the count is process-wide in this torch build
        if failed_here:
            raise failed_here[0]
        self.generated += sum(made_here)
        self.generation_seconds += time.perf_counter() - start


_WORKER: GenerationEngine | None = None


def _start_worker(spec: dict[str, Any], threads: int) -> None:
    global _WORKER
    torch.set_num_threads(threads)
    _WORKER = GenerationEngine(**spec)


def _render_in_worker(batch: list[ImageJob]) -> int:
    _WORKER._save(batch, _WORKER.render(batch))
    return len(batch)


def load_image(path: Path) -> PIL.Image.Image:
    with PIL.Image.open(path) as im:
        return im.convert("RGB")


def image_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def to_tensor(images: Sequence[PIL.Image.Image]) -> torch.Tensor:
    """PIL images -> ``[B,3,H,W]`` float in [0,1]."""
    return torch.from_numpy(np.stack([np.asarray(im, dtype=np.uint8) for im in images])).permute(0, 3, 1, 2).float() / 255
