"""Alignment methods by name. Modules are imported on lookup so the CLI stays quick to start."""

from __future__ import annotations

import importlib

from comat.core.errors import ComatError
from comat.methods.base import Batch, FineTuneMethod, InferenceMethod, Update

# name -> "module:Class". Planned: "softrepa" (FineTuneMethod, soft tokens), "conform" and "attend-excite"
# (InferenceMethod, latent updates during sampling); see comat.methods.base.
METHODS: dict[str, str] = {"comat": "comat.methods.comat.method:CoMat"}

__all__ = ["Batch", "FineTuneMethod", "InferenceMethod", "METHODS", "Update", "get_method"]


def get_method(name: str) -> type[FineTuneMethod] | type[InferenceMethod]:
    if name not in METHODS:
        raise ComatError(f"unknown method '{name}'; available: {', '.join(METHODS)}")
    module, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(module), cls)
