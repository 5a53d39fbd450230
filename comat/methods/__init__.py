"""Alignment methods by name. Modules are imported on lookup so the CLI stays quick to start."""

from __future__ import annotations

from comat.core.registry import Registry
from comat.methods.base import Batch, FineTuneMethod, InferenceMethod, Update

# Planned: "softrepa" (FineTuneMethod, soft tokens), "conform" and "attend-excite" (InferenceMethod, latent updates
# during sampling); see comat.methods.base.
METHODS: Registry[type[FineTuneMethod] | type[InferenceMethod]] = Registry(
    "method", entries={"comat": "comat.methods.comat.method:CoMat"})

__all__ = ["Batch", "FineTuneMethod", "InferenceMethod", "METHODS", "Update", "get_method"]


def get_method(name: str) -> type[FineTuneMethod] | type[InferenceMethod]:
    return METHODS.get(name)
