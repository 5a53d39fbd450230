"""Training the toy model zoo: one resumable loop, one small recipe per model.

Each recipe builds standard diffusers / transformers models from small configs, trains them on scenes
rendered on the fly, and exports them with ``save_pretrained`` into ``comat/toy/zoo/<name>``, where the
same loaders that read hub checkpoints read them. Training state (weights, optimizer, step, RNG) is
checkpointed every ``ckpt_every_s`` seconds, so a killed run resumes where it stopped and ends with
the same weights.
"""

from __future__ import annotations

import concurrent.futures
import copy
import csv
import dataclasses
import functools
import json
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch

from comat.core.checkpoint import load_checkpoint, save_checkpoint
from comat.core.errors import ComatError
from comat.core.io import atomic_write_json
from comat.core.runtime import environment, machine
from comat.models.hub import TOY_ZOO

LOG_EVERY = 25


class Recipe(Protocol):
    name: str
    requires: tuple[str, ...]
    steps: int
    lr: float
    ema: float  # EMA decay of the exported weights (0: export the raw weights)

    def build(self, zoo: Path) -> dict[str, torch.nn.Module]:
        """The models; the trainable parameters are those with ``requires_grad``."""

    # Optional: ``at_step(step, modules, opt)`` runs before every step, for recipes whose schedule has phases
    # (a learning-rate decay, a frozen encoder); it is called again after a resume, so phases survive one.
    # Optional: ``restart_steps`` with ``load_export(modules, zoo)``: later stages that each start from the exported
    # weights (the EMA where there is one) with a fresh optimizer and data stream. A zoo model exported at one of
    # those steps continues from its export alone, so a stage can be added after the work checkpoints are gone.

    def loss(self, modules: dict[str, torch.nn.Module], rng: np.random.Generator) -> tuple[torch.Tensor, dict]:
        """One batch: draw scenes from ``rng``, return the loss and numbers to log."""

    def export(self, modules: dict[str, torch.nn.Module], zoo: Path) -> None:
        """Write the finished model(s) into the zoo with ``save_pretrained``."""


@dataclasses.dataclass
class PretrainConfig:
    seed: int = 0
    threads: int = 1
    ckpt_every_s: float = 120.0
    max_minutes: float | None = None  # stop (checkpointed) after this long; the next call resumes
    pause_at_step: int | None = None  # stop (checkpointed) at this step; deterministic, for tests and chunked runs


def _ema_copy(modules: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Module]:
    return {k: copy.deepcopy(m).requires_grad_(False) for k, m in modules.items() if any(p.requires_grad for p in m.parameters())}


@torch.no_grad()
def _ema_update(ema: dict[str, torch.nn.Module], modules: dict[str, torch.nn.Module], decay: float) -> None:
    for k, shadow in ema.items():
        for s, p in zip(shadow.parameters(), modules[k].parameters()):
            s.lerp_(p, 1 - decay)


def train_recipe(
    recipe: Recipe,
    cfg: PretrainConfig,
    *,
    zoo: Path = TOY_ZOO,
    work: Path,
    progress: Callable[[int, int, dict], None] | None = None,
) -> bool:
    """Train (or resume) ``recipe``; export it when its schedule completes. Returns True when finished."""
    missing = [r for r in recipe.requires if not (zoo / r).is_dir()]
    if missing:
        raise ComatError(f"toy model '{recipe.name}' needs {', '.join(missing)} first; run `comat toy pretrain --only {missing[0]}`")
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    rng = np.random.default_rng(cfg.seed)
    modules = recipe.build(zoo)
    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    ema = _ema_copy(modules) if recipe.ema else {}
    ckpt = work / recipe.name / "last"
    step, elapsed = 0, 0.0
    restarts = tuple(getattr(recipe, "restart_steps", ()))
    exported = read_training_record(zoo, recipe.name)
    continued = None
    if ckpt.exists():
        state = load_checkpoint(ckpt, modules={**modules, **{f"ema_{k}": m for k, m in ema.items()}}, optimizers={"opt": opt}, rng=rng)
        step, elapsed = state["step"], state["extra"]["elapsed_s"]
        continued = state["extra"].get("continued_from")
    elif exported.get("steps") in restarts:
        recipe.load_export(modules, zoo)
        for k, shadow in ema.items():
            shadow.load_state_dict(modules[k].state_dict())
        step, elapsed = exported["steps"], float(exported.get("train_seconds") or 0)
        continued = {"steps": step, "train_seconds": exported.get("train_seconds"), "from": "zoo export (float16)",
                     **({"earlier": exported["continued_from"]} if "continued_from" in exported else {})}
    log_path = work / recipe.name / "log.csv"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start, last_ckpt = time.monotonic(), time.monotonic()

    def checkpoint() -> None:
        save_checkpoint(
            ckpt, step=step, modules={**modules, **{f"ema_{k}": m for k, m in ema.items()}}, optimizers={"opt": opt},
            rng=rng, extra={"elapsed_s": elapsed + time.monotonic() - start, "continued_from": continued},
        )

    for m in modules.values():
        m.train()
    at_step = getattr(recipe, "at_step", None)
    while step < recipe.steps:
        if step in restarts:
            rng = _restart(modules, ema, opt, cfg.seed, step)
        if at_step:
            at_step(step, modules, opt)
        loss, logs = recipe.loss(modules, rng)
        if not torch.isfinite(loss):
            raise ComatError(f"toy '{recipe.name}' loss is {loss.item()} at step {step}; the last checkpoint ({ckpt}) is kept")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if ema:
            _ema_update(ema, modules, recipe.ema)
        step += 1
        if step % LOG_EVERY == 0 or step == recipe.steps:
            row = {"step": step, "loss": round(loss.item(), 5), **{k: round(float(v), 5) for k, v in logs.items()},
                   "elapsed_s": round(elapsed + time.monotonic() - start, 1)}
            new = not log_path.exists()
            with log_path.open("a", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(row))
                if new:
                    writer.writeheader()
                writer.writerow(row)
            if progress:
                progress(step, recipe.steps, row)
        if time.monotonic() - last_ckpt > cfg.ckpt_every_s:
            checkpoint()
            last_ckpt = time.monotonic()
        out_of_time = cfg.max_minutes is not None and time.monotonic() - start > 60 * cfg.max_minutes
        if out_of_time or step == cfg.pause_at_step:
            checkpoint()
            return False
    checkpoint()
    for m in modules.values():
        m.eval()
    final = {**modules, **ema}
    recipe.export(final, zoo)
    atomic_write_json(
        zoo / recipe.name / "training.json",
        {"recipe": recipe.name, "steps": recipe.steps, "lr": recipe.lr, "seed": cfg.seed, "ema": recipe.ema,
         "train_seconds": round(elapsed + time.monotonic() - start), "threads": cfg.threads,
         **({"continued_from": continued} if continued else {}), "environment": environment()},
    )
    return True


@torch.no_grad()
def _restart(modules: dict[str, torch.nn.Module], ema: dict[str, torch.nn.Module], opt: torch.optim.Optimizer,
             seed: int, step: int) -> np.random.Generator:
    """Start a stage from the weights an export at ``step`` would ship; returns the stage's data stream.

    A run from scratch and one continued from the float16 export then differ by that rounding alone."""
    for k, shadow in ema.items():
        modules[k].load_state_dict(shadow.state_dict())
    opt.state.clear()
    torch.manual_seed(seed + step)
    return np.random.default_rng([seed, step])


def export_fp16(model: torch.nn.Module, directory: Path, **kwargs) -> None:
    """``save_pretrained`` in float16: halves the zoo's size; loaders cast back to the dtype they ask for."""
    copy.deepcopy(model).to(torch.float16).save_pretrained(directory, safe_serialization=True, **kwargs)


def read_training_record(zoo: Path, name: str) -> dict:
    path = zoo / name / "training.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _print_progress(name: str, step: int, total: int, row: dict) -> None:
    print(f"{name} {step}/{total} " + " ".join(f"{k}={v}" for k, v in row.items() if k != "step"), file=sys.stderr,
          flush=True)


def _train(recipe: type, cfg: PretrainConfig, zoo: Path, work: Path) -> bool:
    return train_recipe(recipe(), cfg, zoo=zoo, work=work, progress=functools.partial(_print_progress, recipe.name))


def _startable(pending: list[str], requires: dict[str, tuple[str, ...]], unfinished: set[str], slots: int) -> list[str]:
    """The first ``slots`` models of ``pending`` (in order) that need nothing still ``unfinished``."""
    return [n for n in pending if not unfinished & set(requires.get(n, ()))][:slots]


def parallel_wall_seconds(seconds: dict[str, float], requires: dict[str, tuple[str, ...]], jobs: int) -> float:
    """Wall time of :func:`pretrain_zoo` with ``jobs`` workers, given each model's single-run time: the same
    greedy order (the recipes' order, a model starting once what it needs is exported), on idle cores."""
    clock, running, pending = 0.0, [], list(seconds)
    while pending or running:
        unfinished = set(pending) | {n for _, n in running}
        for name in _startable(pending, requires, unfinished, jobs - len(running)):
            pending.remove(name)
            running.append((clock + seconds[name], name))
        running.sort()
        clock, _ = running.pop(0)
    return clock


def _seconds_per_step(recipe: type, cfg: PretrainConfig, zoo: Path, warmup: int, steps: int) -> float:
    marks: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as work:
        train_recipe(recipe(), dataclasses.replace(cfg, pause_at_step=warmup + steps, ckpt_every_s=float("inf")),
                     zoo=zoo, work=Path(work), progress=lambda step, total, row: marks.setdefault(step, time.monotonic()))
    return (marks[warmup + steps] - marks[warmup]) / steps


def profile_zoo(recipes: list[type], cfg: PretrainConfig, *, zoo: Path = TOY_ZOO, jobs: int = 1, warmup: int = LOG_EVERY,
                steps: int = 2 * LOG_EVERY) -> dict:
    """Time ``steps`` training steps of each recipe after ``warmup`` ones (throw-away checkpoints; the zoo is only
    read), ``jobs`` recipes at a time as ``pretrain_zoo`` runs them, and extrapolate to the full schedules.

    Times the first phase of each schedule, which for the phased recipes is the most expensive one. Models a
    recipe requires are read from ``zoo``, so they must be there."""
    if warmup % LOG_EVERY or steps % LOG_EVERY or steps <= 0:
        raise ComatError(f"profile warmup {warmup} and steps {steps} must be positive multiples of {LOG_EVERY}")
    short = [r.name for r in recipes if r.steps < warmup + steps]
    if short:
        raise ComatError(f"{', '.join(short)}: schedule shorter than the {warmup + steps} steps a profile times")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {r.name: pool.submit(_seconds_per_step, r, cfg, zoo, warmup, steps) for r in recipes}
        per_step = {name: round(f.result(), 4) for name, f in futures.items()}
    models = {r.name: {"seconds_per_step": per_step[r.name], "steps": r.steps, "seconds": round(per_step[r.name] * r.steps)}
              for r in recipes}
    seconds = {name: m["seconds"] for name, m in models.items()}
    return {"models": models, "total_seconds": sum(seconds.values()),
            "wall_seconds": round(parallel_wall_seconds(seconds, {r.name: r.requires for r in recipes}, jobs)),
            "protocol": {"jobs": jobs, "threads": cfg.threads, "warmup_steps": warmup, "timed_steps": steps,
                         "seed": cfg.seed, "machine": machine()},
            "environment": environment()}


def profile_lines(profile: dict) -> list[str]:
    """Markdown lines for a :func:`profile_zoo` result."""
    p = profile["protocol"]
    lines = [f"- {name}: {m['seconds_per_step']:.3f} s/step x {m['steps']} steps = {m['seconds']} s"
             for name, m in profile["models"].items()]
    return lines + [f"- total: {profile['total_seconds'] / 3600:.2f} h; wall time with `--jobs {p['jobs']}`: "
                    f"{profile['wall_seconds'] / 3600:.2f} h",
                    f"- protocol: {p['timed_steps']} steps timed after {p['warmup_steps']} warm-up steps, {p['jobs']} "
                    f"recipes at a time, {p['threads']} thread(s) each, seed {p['seed']}"
                    + (f", {p['machine']['cpu']} ({p['machine']['cores']} cores)" if "machine" in p else "") + "; "
                    + ", ".join(f"{k} {v}" for k, v in profile["environment"].items())]


def pretrain_zoo(recipes: list[type], cfg: PretrainConfig, *, zoo: Path = TOY_ZOO, work: Path, jobs: int = 1,
                 force: bool = False, log: Callable[[str], None] = print) -> bool:
    """Train ``recipes`` (classes, dependencies first) ``jobs`` at a time (one process each, ``cfg.threads``
    threads apiece), skipping models already in the zoo. Returns True when every one of them is in the zoo.

    Independent models train side by side because one small model cannot keep several cores busy: on the
    2-core development machine two single-threaded recipes finish the zoo in about half the wall time."""
    pending = []
    for recipe in recipes:
        if read_training_record(zoo, recipe.name).get("steps", 0) >= recipe.steps and not force:
            log(f"{recipe.name}: already in the zoo ({zoo / recipe.name}); --force retrains it")
        else:
            pending.append(recipe)

    def report(recipe: type, done: bool) -> None:
        where = "exported to " + str(zoo / recipe.name) if done else "paused (checkpointed); rerun to resume"
        log(f"{recipe.name}: {where}")

    if jobs == 1:
        for recipe in pending:
            done = _train(recipe, cfg, zoo, work)
            report(recipe, done)
            if not done:
                return False
        return True
    blocked: set[str] = set()  # paused models and everything waiting on them
    running: dict[concurrent.futures.Future, type] = {}
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        while pending or running:
            busy = {r.name for r in pending} | {r.name for r in running.values()} | blocked
            by_name = {r.name: r for r in pending}
            for name in _startable(list(by_name), {n: r.requires for n, r in by_name.items()}, busy, jobs - len(running)):
                recipe = by_name[name]
                pending.remove(recipe)
                running[pool.submit(_train, recipe, cfg, zoo, work)] = recipe
            if not running:
                blocked.update(r.name for r in pending)
                break
            finished, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in finished:
                recipe = running.pop(future)
                done = future.result()
                report(recipe, done)
                if not done:
                    blocked.add(recipe.name)
    return not blocked
