"""Where benchmarks are found: suites of protocol entries, and the adapter classes that register themselves.

A suite is a package with a ``protocols.yaml`` beside its ``__init__``, declared in the ``comat.benchmarks``
entry-point group (the project's own adapters are the suite ``comat_benchmarks``, the repository's
``benchmarks/`` folder). Each protocol entry names the module of its adapter; importing that module runs
:func:`register`. Adding a benchmark is one module plus one protocol entry.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
from pathlib import Path

import yaml

from comat.core.config import deep_merge
from comat.core.errors import ComatError
from comat.core.registry import Registry, import_object
from comat.evaluation.benchmark import Benchmark, Protocol
from comat.evaluation.data import DataFile
from comat.generation.engine import SamplerSettings

SUITE_GROUP = "comat.benchmarks"
WORLDS = ("real", "toy")
BENCHMARKS: Registry[type[Benchmark]] = Registry("benchmark")


def register(cls: type[Benchmark]) -> type[Benchmark]:
    """Class decorator of an adapter; a second adapter under a name already registered is refused."""
    return BENCHMARKS.register(cls.name, cls)


@functools.cache
def protocol_entries() -> dict[str, tuple[dict, Path]]:
    """Every suite's protocol entries: name -> (entry, the protocols.yaml it came from)."""
    entries: dict[str, tuple[dict, Path]] = {}
    for ep in sorted(importlib.metadata.entry_points(group=SUITE_GROUP), key=lambda e: e.name):
        package = import_object(ep.value)
        path = Path(package.__file__).with_name("protocols.yaml")  # type: ignore[attr-defined]
        try:
            suite = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ComatError(f"{path}: benchmark suite '{ep.name}' has no readable protocols.yaml ({e})") from None
        for name, entry in suite.items():
            if name in entries:
                raise ComatError(f"benchmark '{name}' is defined in both {entries[name][1]} and {path}; rename one")
            entries[name] = (entry, path)
    if not entries:
        raise ComatError(f"no benchmark suite is installed (entry-point group {SUITE_GROUP}); reinstall comat "
                         "with `pip install -e .`")
    return entries


def benchmark_names() -> list[str]:
    return sorted(protocol_entries())


def load_protocol(name: str, world: str = "real", overrides: dict | None = None) -> Protocol:
    entries = protocol_entries()
    if name not in entries:
        raise ComatError(f"unknown benchmark '{name}'; available: {', '.join(sorted(entries))}")
    if world not in WORLDS:
        raise ComatError(f"unknown world '{world}'; use one of {', '.join(WORLDS)}")
    entry, source = entries[name]
    raw = {k: v for k, v in entry.items() if k not in WORLDS}
    raw = deep_merge(deep_merge(raw, entry.get(world) or {}), overrides or {})
    fields = {f.name for f in dataclasses.fields(Protocol)} - {"name", "world"}
    unknown = set(raw) - fields
    if unknown:
        raise ComatError(f"{source}: entry '{name}' has unknown field(s) {', '.join(sorted(unknown))}; "
                         f"fields are {', '.join(sorted(fields))}")
    try:
        return Protocol(name=name, world=world, **{**raw, "sampler": SamplerSettings(**raw.get("sampler", {})),
                                                   "data": tuple(DataFile(**d) for d in raw.get("data", ()))})
    except TypeError as e:
        raise ComatError(f"{source}: entry '{name}' is malformed ({e})") from None


def benchmark_class(protocol: Protocol) -> type[Benchmark]:
    import_object(protocol.module)
    if protocol.name not in BENCHMARKS:
        raise ComatError(f"module {protocol.module} registers no benchmark named '{protocol.name}'")
    return BENCHMARKS.get(protocol.name)

