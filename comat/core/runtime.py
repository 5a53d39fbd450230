"""Device choice and the package versions recorded beside every output."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path

import torch

from comat.core.errors import ComatError

RECORDED_PACKAGES = ("comat", "torch", "diffusers", "transformers", "peft", "accelerate", "spacy")
THREADS_ENV, PROCESSES_ENV = "COMAT_THREADS", "COMAT_PROCESSES"


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, which containers and ``taskset`` narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _count(value: int | str | None, source: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise ComatError(f"{source}={value!r}: give a whole number of at least 1")
    return n


def configure_threads(threads: int | None = None) -> int:
    """Set torch's threads for this process: ``threads`` (``--threads``), else ``$COMAT_THREADS``, else every usable
    core. Returns the number set."""
    n = _count(threads, "--threads") or _count(os.environ.get(THREADS_ENV), THREADS_ENV) or usable_cores()
    torch.set_num_threads(n)
    return n


def cpu_processes(processes: int | None = None) -> int:
    """Processes to share CPU work over: ``processes`` (``--processes``), else ``$COMAT_PROCESSES``, else every
    usable core (each process then runs ``threads // processes`` torch threads)."""
    return _count(processes, "--processes") or _count(os.environ.get(PROCESSES_ENV), PROCESSES_ENV) or usable_cores()


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ComatError(f"device '{device}' was asked for but no CUDA device is available; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ComatError(f"device '{device}' is not a torch device; use auto, cpu, cuda or cuda:N") from None


def environment() -> dict[str, str]:
    versions = {}
    for name in RECORDED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return {"python": platform.python_version(), **versions}


def machine() -> dict[str, str | int]:
    """The CPU that timings were taken on: the same code ran 1.5x slower on one 2-core host than on another."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        # Virtual machines often report a bare "AMD EPYC": family and model tell the generations apart.
        fields = dict(line.split(":", 1) for line in cpuinfo.read_text().splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        if "model name" in fields:
            model = f"{fields['model name']} (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')})"
    return {"cpu": model, "cores": os.cpu_count() or 1}


def cache_dir() -> Path:
    """Where reusable artefacts live (generated images, judge answers, latents, data): ``$COMAT_CACHE``, default
    ``~/.cache/comat``."""
    return Path(os.environ.get("COMAT_CACHE", Path.home() / ".cache" / "comat"))
