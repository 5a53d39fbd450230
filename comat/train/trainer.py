"""The training loop of every :class:`~comat.methods.base.FineTuneMethod` (``comat train``), SD1.5, SDXL and toy alike.

Distributed work goes through accelerate (``accelerate launch -m comat.cli train ...``). The UNet is deliberately not
wrapped in DDP: one training step calls it ``T`` times, ``K`` of them with a graph, and a DDP module expects one
forward per backward. Trainable tensors start equal on every rank (the global RNG is seeded with ``seed`` alone
before the method builds them) and their gradients are averaged by hand before clipping, which is what DDP would do.

Randomness. Every micro-batch draws its prompts, noise and choices from streams derived from
``(seed, rank, step, micro-batch)``: ranks differ, and a resumed run replays the same draws without restoring any
stream. Checkpoints still hold the global torch/numpy/python (and CUDA) RNG states, both optimisers and the AMP
scaler, so nothing else drifts. Under fp16 one GradScaler serves all optimisers (PyTorch's multi-optimiser AMP
recipe): every update's backward runs first, then all are unscaled, clipped and stepped, then the scale updates.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import random
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from diffusers.training_utils import EMAModel
from torch import Tensor

from comat.core.checkpoint import load_checkpoint, save_checkpoint
from comat.core.config import config_to_dict, write_resolved
from comat.core.errors import ComatError
from comat.core.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from comat.core.runtime import environment, machine, resolve_device
from comat.core.worlds import WORLDS
from comat.methods import Batch, FineTuneMethod, get_method
from comat.methods.comat.config import TrainConfig

CKPT, LORA, LOG = "checkpoint", "lora", "log.csv"
# Fields that may change between a checkpoint and its resumption.
RESUMABLE_CHANGES = ("steps", "ckpt_every", "sample_every")
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def load_prompts(cfg: TrainConfig) -> list[str]:
    """The training prompts: ``prompts=FILE`` (one per line), a world's train split for ``prompts=WORLD`` (``toy``,
    the default of toy models), or ``prompts=WORLD-open``: prompts over every attribute-object combination,
    held-out pairs included, except the evaluation prompts (image-free prompts, as the paper's training set shares
    its attribute-object pairs with T2I-CompBench's evaluation prompts). Either set takes a category list,
    ``toy-open:color,single``; without one it holds the world's default categories."""
    name, _, categories = (cfg.prompts or "toy").partition(":")
    world_name, _, split = name.partition("-")
    if world_name in WORLDS and split in ("", "open"):
        if cfg.prompts is None and not str(cfg.model).startswith("toy"):
            raise ComatError("no training prompts: set prompts=FILE, one prompt per line (the paper trains on "
                             "T2I-CompBench train + HRS-Bench + ABC-6K), or prompts=toy")
        world = WORLDS.get(world_name)
        chosen = tuple(categories.split(",")) if categories else world.default_categories
        unknown = [c for c in chosen if c not in world.categories]
        if unknown:
            raise ComatError(f"prompts={cfg.prompts}: no {world_name} category '{unknown[0]}'; list some of "
                             f"{', '.join(world.categories)} after the colon")
        return [p for c in chosen for p in world.prompts(c, split or "train")]
    from comat.generation.generate import read_prompt_file

    try:
        return read_prompt_file(cfg.prompts)
    except OSError as e:
        raise ComatError(f"prompt file '{cfg.prompts}' cannot be read ({e.strerror}); check its permissions") from None


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _resume_key(cfg: TrainConfig, method: str) -> dict:
    # The base weights too: a model id such as 'toy' or a local path can name other weights after a retraining.
    from comat.models.fingerprint import model_fingerprint

    return {"method": method, "model_sha256": model_fingerprint(cfg.model),
            **{k: v for k, v in _flat(config_to_dict(cfg)).items() if k not in RESUMABLE_CHANGES}}


class Trainer:
    """Builds the pipeline and the method, then runs optimiser steps; ``run`` is the whole training."""

    def __init__(self, cfg: TrainConfig, out: str | Path, *, method: str = "comat", device: str = "auto",
                 log: Callable[[str], None] = print):
        from accelerate import Accelerator

        from comat.models.t2i import load_t2i

        self.cfg, self.out, self.method_name, self.log = cfg.validate(), Path(out), method, log
        if cfg.captioner.kind == "none" and cfg.discriminator.kind == "none" and not cfg.attribute_concentration.enabled:
            raise ComatError("every loss is switched off (captioner none, discriminator none, AC off): nothing to train")
        self.prompts = load_prompts(cfg)  # bad input fails before any model loads
        target = resolve_device(device)
        cpu = target.type == "cpu"
        if target.index is not None and not cpu:
            torch.cuda.set_device(target)  # a single process on a chosen GPU; accelerate launch sets it per rank
        precision = "no" if cpu else cfg.mixed_precision
        if precision != cfg.mixed_precision:
            log(f"mixed_precision={cfg.mixed_precision} needs a GPU; running in float32 on the CPU")
        self.acc = Accelerator(cpu=cpu, mixed_precision=precision, gradient_accumulation_steps=cfg.grad_accum)
        # The same seed on every rank: trainable tensors must start equal, nothing broadcasts them.
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        random.seed(cfg.seed)
        self.pipe = load_t2i(cfg.model, device=self.acc.device, dtype=DTYPES[precision])
        for part in self.pipe.components.values():
            if isinstance(part, torch.nn.Module):
                part.requires_grad_(False)
        self.pipe.vae.to(torch.float32)
        cls = get_method(method)
        if not issubclass(cls, FineTuneMethod):
            raise ComatError(f"method '{method}' works at sampling time; there is nothing to train")
        self.method = cls(cfg, self.pipe, self.acc, log)
        self.updates = self.method.updates()
        self.optimizers = {u.name: torch.optim.AdamW(u.params, lr=u.lr, betas=u.betas, weight_decay=u.weight_decay)
                           for u in self.updates}
        # The generator's tensors only: the discriminator is not exported.
        self.ema = EMAModel(self.updates[0].params, decay=cfg.ema_decay) if cfg.ema_decay else None
        self.scaler = self.acc.scaler  # None unless fp16 on a GPU
        self.step = 0
        self.saved_step: int | None = None

    # -- one step ------------------------------------------------------------------------------------

    def batch(self, step: int, micro: int) -> Batch:
        cfg = self.cfg
        host, dev = np.random.SeedSequence([cfg.seed, self.acc.process_index, step, micro]).spawn(2)
        rng = np.random.default_rng(host)
        idx = rng.choice(len(self.prompts), size=cfg.batch, replace=cfg.batch > len(self.prompts))
        gen = torch.Generator().manual_seed(int(dev.generate_state(1, np.uint64)[0] >> 1))
        return Batch([self.prompts[i] for i in idx], step, gen, rng)

    def _check(self, terms: dict[str, Tensor]) -> None:
        bad = next((f"loss term '{k}' is {float(v)}" for k, v in terms.items() if not torch.isfinite(v).all()), None)
        if self.acc.num_processes > 1:  # all ranks stop together, or the others would wait in the next all-reduce
            flags = self.acc.gather(torch.tensor([int(bad is not None)], device=self.acc.device))
            if bad is None and flags.any():
                bad = f"a loss term is not finite on rank {int(flags.nonzero()[0])}"
        if bad is not None:
            kept = (f"the last good checkpoint (step {self.saved_step}) is kept in {self.out / CKPT}"
                    if self.saved_step is not None else "no checkpoint had been written yet")
            raise ComatError(f"step {self.step + 1}: {bad}; training stopped, {kept}")

    def train_step(self) -> dict[str, float]:
        """One optimiser step over ``grad_accum`` micro-batches; returns the mean of every logged term."""
        logged: dict[str, float] = defaultdict(float)
        n = self.cfg.grad_accum
        for micro in range(n):
            batch = self.batch(self.step, micro)
            with self.acc.accumulate():
                for i, update in enumerate(self.updates):
                    terms = update.loss(batch)
                    self._check(terms)
                    parts = [v for k, v in terms.items() if not k.startswith("_")]
                    loss = torch.stack([p.float() for p in parts]).sum() if parts else None
                    if loss is not None and loss.requires_grad:  # e.g. AC alone with every prompt skipped
                        self.acc.backward(loss)
                    for k, v in terms.items():
                        logged[k.lstrip("_")] += float(v.detach()) / n
                    if i == 0 and loss is not None:
                        logged["loss"] += float(loss.detach()) / n
                if self.acc.sync_gradients:
                    logged.update(self._apply())
        if self.acc.num_processes > 1:  # log the global batch, not rank 0's share of it
            keys = sorted(logged)
            means = self.acc.reduce(torch.tensor([logged[k] for k in keys], device=self.acc.device), "mean")
            logged.update(zip(keys, means.tolist()))
        self.step += 1
        return dict(logged)

    def _apply(self) -> dict[str, float]:
        norms = {}
        for update in self.updates:
            grads = [p for p in update.params if p.grad is not None]
            if self.acc.num_processes > 1:
                for p in grads:
                    p.grad = self.acc.reduce(p.grad, "mean")
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizers[update.name])
            if update.grad_clip:
                norms[f"gnorm_{update.name}"] = float(torch.nn.utils.clip_grad_norm_(grads, update.grad_clip))
        for opt in self.optimizers.values():
            self.scaler.step(opt) if self.scaler is not None else opt.step()
            opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.update()
        if self.ema is not None:
            self.ema.step(self.updates[0].params)
        return norms

    # -- state ---------------------------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        if self.acc.is_main_process:
            np_state = np.random.get_state()
            extra = {
                "resume_key": _resume_key(self.cfg, self.method_name),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
                "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else None,
            }
            save_checkpoint(self.out / CKPT, step=self.step, modules=self.method.state_modules(),
                            optimizers=self._states(), extra=extra, trainable_only=True)
        self.acc.wait_for_everyone()
        self.saved_step = self.step

    def _states(self) -> dict:
        return {**self.optimizers, "ema": self.ema} if self.ema is not None else self.optimizers

    def load_checkpoint(self) -> None:
        path = self.out / CKPT
        state = load_checkpoint(path, modules=self.method.state_modules(), optimizers=self._states(), strict=False)
        extra = state["extra"]
        theirs, ours = extra["resume_key"], _resume_key(self.cfg, self.method_name)
        # A field added after the checkpoint was written counts as its default there: old runs still resume.
        defaults = _flat(config_to_dict(TrainConfig()))
        theirs = {k: theirs.get(k, defaults.get(k)) for k in ours}
        changed = sorted(k for k in ours if theirs[k] != ours[k])
        if changed:
            raise ComatError(f"the checkpoint in {path} was written with a different {changed[0]} "
                             f"({theirs[changed[0]]!r}, now {ours[changed[0]]!r}); use another --out or --no-resume")
        if self.scaler is not None and extra["scaler"]:
            self.scaler.load_state_dict(extra["scaler"])
        kind, keys, *rest = extra["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
        if extra["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in extra["cuda"]])
        self.step = self.saved_step = state["step"]

    # -- outputs -------------------------------------------------------------------------------------

    def save_lora(self, path: Path) -> None:
        """The trained adapter; with ``ema_decay`` the EMA weights, the online ones staying in place for training."""
        if self.ema is None:
            self.method.save(path)
            return
        params = self.updates[0].params
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            self.method.save(path)
        finally:
            self.ema.restore(params)

    def preview(self) -> Path:
        """A grid of fixed prompts and seeds, sampled with the training sampler: ``samples/step_XXXXXX.png``."""
        from PIL import Image
        from torchvision.utils import make_grid

        from comat.generation.sampling import decode, encode, initial_latents, make_scheduler, sample_with_grad

        cfg, pipe = self.cfg, self.pipe
        picks = np.linspace(0, len(self.prompts) - 1, min(4, len(self.prompts))).round().astype(int)
        prompts = list(dict.fromkeys(self.prompts[i] for i in picks))
        gens = [torch.Generator().manual_seed(cfg.seed + j) for j in range(len(prompts))]
        scheduler = make_scheduler(pipe, cfg.sampler)
        with torch.no_grad():
            with self.acc.autocast():
                z = initial_latents(pipe, len(prompts), height=cfg.resolution, width=cfg.resolution, generator=gens,
                                    scheduler=scheduler, dtype=torch.float32)
                embeds = encode(pipe, prompts, height=cfg.resolution, width=cfg.resolution)
                z = sample_with_grad(pipe.unet, scheduler, embeds, z, steps=cfg.sample_steps, guidance=cfg.guidance,
                                     generator=gens)
            images = decode(pipe.vae, z.float())
        grid = make_grid(images.cpu(), nrow=len(prompts), padding=2)
        buf = io.BytesIO()
        Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(buf, format="PNG")
        path = self.out / "samples" / f"step_{self.step:06d}.png"
        atomic_write_bytes(path, buf.getvalue())
        atomic_write_text(path.parent / "prompts.txt", "\n".join(prompts) + "\n")
        return path

    def run(self, *, resume: bool | None = None, progress: bool = False) -> Path:
        """Train to ``cfg.steps`` (resuming from ``out/checkpoint`` unless ``resume=False``); return the LoRA dir."""
        cfg, out = self.cfg, self.out
        main = self.acc.is_main_process
        if resume and not (out / CKPT).is_dir():
            raise ComatError(f"--resume: no checkpoint in {out / CKPT}")
        if resume is not False and (out / CKPT).is_dir():
            self.load_checkpoint()
            self.log(f"resumed from {out / CKPT} at step {self.step}")
        if main:
            out.mkdir(parents=True, exist_ok=True)
            write_resolved(cfg, out, {"method": self.method_name, "prompts": len(self.prompts),
                                      "device": str(self.acc.device), "processes": self.acc.num_processes,
                                      "mixed_precision": self.acc.mixed_precision, "environment": environment(),
                                      "machine": machine(), "torch_threads": torch.get_num_threads()})
        logger = _Log(out, self.step, enabled=main)
        if main and self.step == 0:
            self.preview()
        bar = _Progress(cfg.steps, self.step, enabled=progress and main)
        try:
            while self.step < cfg.steps:
                t0 = time.perf_counter()
                row = self.train_step()
                row["sec"] = time.perf_counter() - t0
                logger.write(self.step, row)
                bar.update(self.step, row)
                if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps:
                    self.save_checkpoint()
                if main and (self.step % cfg.sample_every == 0 or self.step == cfg.steps):
                    self.preview()
        finally:
            bar.close()
            logger.close()
        lora = out / LORA
        if main:
            self.save_lora(lora)
        self.acc.wait_for_everyone()
        return lora


class _Log:
    """``log.csv`` (one row per step, every term), and TensorBoard when installed. On resume, rows past the
    checkpoint (written before the run stopped) are dropped."""

    def __init__(self, out: Path, step: int, enabled: bool):
        self.path, self.enabled, self.writer, self.fields, self.file = out / LOG, enabled, None, None, None
        if not enabled:
            return
        if self.path.is_file():
            rows = list(csv.DictReader(self.path.open()))
            kept = [r for r in rows if int(r["step"]) <= step]
            if kept:
                self.fields = list(rows[0].keys())
                buf = io.StringIO()
                w = csv.DictWriter(buf, self.fields)
                w.writeheader(), w.writerows(kept)
                atomic_write_text(self.path, buf.getvalue())
            else:
                self.path.unlink()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=step + 1)
        except ImportError:
            pass

    def write(self, step: int, row: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: f"{v:.6g}" for k, v in row.items()}}
        if self.file is None:
            new = self.fields is None
            self.fields = self.fields or list(row)
            self.file = self.path.open("a", newline="")
            self.csv = csv.DictWriter(self.file, self.fields, extrasaction="ignore")
            if new:
                self.csv.writeheader()
        self.csv.writerow(row)
        self.file.flush()
        if self.writer is not None:
            for k, v in row.items():
                if k != "step":
                    self.writer.add_scalar(k, float(v), step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()


class _Progress:
    def __init__(self, total: int, done: int, enabled: bool):
        self.bar = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(BarColumn(bar_width=20), MofNCompleteColumn(), TimeRemainingColumn(),
                                TextColumn("{task.description}"), console=Console(stderr=True))
            self.task = self.bar.add_task("", total=total, completed=done)
            self.bar.start()

    def update(self, step: int, row: dict[str, float]) -> None:
        if self.bar is not None:
            text = " ".join(f"{k}={v:.3g}" for k, v in row.items() if not k.startswith(("gnorm", "sec")))
            self.bar.update(self.task, completed=step, description=text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def train(cfg: TrainConfig, out: str | Path, *, method: str = "comat", device: str = "auto",
          resume: bool | None = None, progress: bool = False, log: Callable[[str], None] = print) -> Path:
    """Train ``method`` with ``cfg`` into ``out`` (checkpoint, log.csv, samples/, lora/); return the LoRA dir."""
    return Trainer(cfg, out, method=method, device=device, log=log).run(resume=resume, progress=progress)


# ------------------------------------------------------------------------------------------------ profile


class _PeakMemory:
    """Peak memory of a block: CUDA allocator peak on a GPU, else the peak RSS sampled every 2 ms."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self) -> "_PeakMemory":
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        import ctypes

        import psutil

        try:  # hand freed heap back to the OS so the previous phase does not inflate this one's baseline
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        proc = psutil.Process()
        self.base = self.peak = proc.memory_info().rss
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.wait(0.002):
                self.peak = max(self.peak, proc.memory_info().rss)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()


def profile(cfg: TrainConfig, out: str | Path, *, steps: int = 3, device: str = "auto",
            log: Callable[[str], None] = print) -> dict:
    """Step time and peak memory with capture on the layers AC needs vs explicit attention on every layer
    (the official code's cost model), in one process; written to ``out/profile.json``."""
    from comat.generation.attention import AttentionStore

    if not cfg.attribute_concentration.enabled:
        # What is measured is the cost of AC's capture, so a config with AC off (the toy preset) is profiled with it on.
        log("--profile measures attention capture: attribute concentration is on for these steps")
    ac = dataclasses.replace(cfg.attribute_concentration, enabled=True)
    cfg = dataclasses.replace(cfg, steps=10**9, ckpt_every=10**9, sample_every=10**9, attribute_concentration=ac)
    trainer = Trainer(cfg, out, device=device, log=log)
    method = trainer.method
    results = {}
    for mode in ("selective", "capture_all"):
        if mode == "capture_all":
            method.store.remove()
            method.store = AttentionStore(cfg.attribute_concentration.blocks, capture_all=True).install(trainer.pipe.unet)
        times = []
        with _PeakMemory(trainer.acc.device) as mem:
            for _ in range(steps):
                t0 = time.perf_counter()
                trainer.train_step()
                if trainer.acc.device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
        timed = times[1:] or times  # the first step warms caches up
        results[mode] = {"sec_per_step": sum(timed) / len(timed), "peak_mb": mem.peak / 2**20,
                         "over_start_mb": (mem.peak - mem.base) / 2**20, "steps": steps,
                         "explicit_layers": sum(type(p).__name__ == "CaptureProcessor" for p in trainer.pipe.unet.attn_processors.values())}
    kind = "CUDA allocated" if trainer.acc.device.type == "cuda" else "process RSS"
    results["memory"] = kind
    for mode in ("selective", "capture_all"):
        r = results[mode]
        log(f"{mode:12s} {r['sec_per_step']:.3f} s/step  peak {kind} {r['peak_mb']:.0f} MB "
            f"(+{r['over_start_mb']:.0f} MB during the steps)  capture processors on {r['explicit_layers']} layers")
    Path(out).mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(out) / "profile.json", results)
    return results
