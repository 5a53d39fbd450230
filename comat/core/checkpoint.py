"""Resumable training checkpoints: module weights, optimizer states, step and RNG states.

Weights go to safetensors; optimizer state (tensors and numbers only) is read back with
``weights_only=True``, so a checkpoint never unpickles code. A checkpoint directory is written under a
temporary name and renamed into place, so a kill mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from comat.core.errors import ComatError

STATE_FILE = "state.json"


def _rng_state(rng: np.random.Generator | None) -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state().tolist(),
        "python": random.getstate()[1][:625],
        "numpy": rng.bit_generator.state if rng is not None else None,
    }


def _restore_rng(state: dict[str, Any], rng: np.random.Generator | None) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    random.setstate((3, tuple(state["python"]), None))
    if rng is not None and state["numpy"] is not None:
        rng.bit_generator.state = state["numpy"]


def save_checkpoint(
    directory: str | os.PathLike,
    *,
    step: int,
    modules: dict[str, torch.nn.Module],
    optimizers: dict[str, Any] | None = None,
    rng: np.random.Generator | None = None,
    extra: dict[str, Any] | None = None,
    trainable_only: bool = False,
) -> Path:
    """Write a checkpoint to ``directory`` atomically (replacing any previous one there). ``optimizers`` takes any
    object whose ``state_dict`` holds only tensors and numbers (an ``EMAModel`` too)."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, module in modules.items():
        # clone(): tied weights (e.g. BLIP's decoder embeddings) share storage, which safetensors refuses.
        state = {
            k: v.detach().cpu().clone()
            for k, v in module.state_dict().items()
            if not trainable_only or _is_trainable(module, k)
        }
        save_file(state, tmp / f"{name}.safetensors")
    for name, opt in (optimizers or {}).items():
        torch.save(opt.state_dict(), tmp / f"{name}.optim.pt")
    (tmp / STATE_FILE).write_text(json.dumps({"step": step, "rng": _rng_state(rng), "extra": extra or {}}))
    old = directory.with_name(directory.name + ".old")
    if directory.exists():
        directory.rename(old)
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)
    return directory


def _is_trainable(module: torch.nn.Module, key: str) -> bool:
    params = dict(module.named_parameters())
    return key in params and params[key].requires_grad


def load_checkpoint(
    directory: str | os.PathLike,
    *,
    modules: dict[str, torch.nn.Module],
    optimizers: dict[str, Any] | None = None,
    rng: np.random.Generator | None = None,
    strict: bool = True,
) -> dict[str, Any]:
    """Restore what ``save_checkpoint`` wrote; return the state (``step``, ``extra``)."""
    directory = Path(directory)
    if not (directory / STATE_FILE).is_file():
        raise ComatError(f"checkpoint '{directory}' is incomplete (no {STATE_FILE}); delete it or resume from another")
    for name, module in modules.items():
        missing, unexpected = module.load_state_dict(load_file(directory / f"{name}.safetensors"), strict=False)
        if unexpected or (strict and missing):
            raise ComatError(
                f"checkpoint '{directory}/{name}.safetensors' does not match the model "
                f"({len(missing)} missing, {len(unexpected)} unexpected tensors); was it written with another config?"
            )
    for name, opt in (optimizers or {}).items():
        opt.load_state_dict(torch.load(directory / f"{name}.optim.pt", weights_only=True))
    state = json.loads((directory / STATE_FILE).read_text())
    _restore_rng(state["rng"], rng)
    return state
