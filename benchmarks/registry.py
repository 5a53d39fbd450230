"""The benchmark registry: a protocol entry in ``protocols.yaml`` plus one adapter module per benchmark.

A protocol entry fixes everything that makes a number comparable (data version, images per prompt, seeds,
sampler, judges); its ``toy`` block overrides fields for the toy world, whose judges stand in for the real ones
in the same architectures, so the adapter's scoring code is the same in both worlds. An adapter subclasses
:class:`Benchmark` and registers itself with :func:`register`.
"""

from __future__ import annotations

import dataclasses
import importlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Sequence

import yaml

from benchmarks.data import DataFile, FetchedFile, fetch
from comat.engine import SamplerSettings
from comat.errors import ComatError

PROTOCOLS_FILE = Path(__file__).with_name("protocols.yaml")
WORLDS = ("real", "toy")
REGISTRY: dict[str, type["Benchmark"]] = {}


@dataclasses.dataclass(frozen=True)
class Protocol:
    name: str
    module: str
    world: str
    data_version: str
    images_per_prompt: int
    seed: int  # image j of every prompt uses seed + j
    sampler: SamplerSettings
    judges: dict[str, str]
    data: tuple[DataFile, ...] = ()
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def seeds(self) -> list[int]:
        return [self.seed + j for j in range(self.images_per_prompt)]

    def summary(self) -> dict[str, Any]:
        """The fields printed beside every number."""
        return {"benchmark": self.name, "world": self.world, "data": self.data_version,
                "images_per_prompt": self.images_per_prompt, "seeds": f"{self.seed}..{self.seed + self.images_per_prompt - 1}",
                "sampler": f"{self.sampler.scheduler} {self.sampler.steps} steps, cfg {self.sampler.guidance}",
                "judges": ", ".join(f"{k}={v}" for k, v in self.judges.items()), **self.options}


@dataclasses.dataclass(frozen=True)
class Sample:
    """One prompt of a benchmark. ``id`` is stable across runs (it names the prompt in the per-sample JSONL)."""

    id: str
    prompt: str
    category: str
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _protocol_entries() -> dict[str, dict]:
    return yaml.safe_load(PROTOCOLS_FILE.read_text())


def benchmark_names() -> list[str]:
    return sorted(_protocol_entries())


def load_protocol(name: str, world: str = "real", overrides: dict | None = None) -> Protocol:
    entries = _protocol_entries()
    if name not in entries:
        raise ComatError(f"unknown benchmark '{name}'; available: {', '.join(sorted(entries))}")
    if world not in WORLDS:
        raise ComatError(f"unknown world '{world}'; use one of {', '.join(WORLDS)}")
    raw = {k: v for k, v in entries[name].items() if k not in WORLDS}
    raw = _merge(_merge(raw, entries[name].get(world) or {}), overrides or {})
    fields = {f.name for f in dataclasses.fields(Protocol)} - {"name", "world"}
    unknown = set(raw) - fields
    if unknown:
        raise ComatError(f"{PROTOCOLS_FILE}: entry '{name}' has unknown field(s) {', '.join(sorted(unknown))}; "
                         f"fields are {', '.join(sorted(fields))}")
    try:
        return Protocol(name=name, world=world, **{**raw, "sampler": SamplerSettings(**raw.get("sampler", {})),
                                                   "data": tuple(DataFile(**d) for d in raw.get("data", ()))})
    except TypeError as e:
        raise ComatError(f"{PROTOCOLS_FILE}: entry '{name}' is malformed ({e})") from None


def register(cls: type["Benchmark"]) -> type["Benchmark"]:
    REGISTRY[cls.name] = cls
    return cls


def benchmark_class(protocol: Protocol) -> type["Benchmark"]:
    importlib.import_module(protocol.module)
    if protocol.name not in REGISTRY:
        raise ComatError(f"module {protocol.module} registers no benchmark named '{protocol.name}'")
    return REGISTRY[protocol.name]


class Benchmark(ABC):
    """Load the benchmark's samples, score generated images with the official formula, aggregate as upstream."""

    name: ClassVar[str]

    def __init__(self, protocol: Protocol, *, data: Path | None = None, unpinned: bool = False):
        self.protocol = protocol
        self.data_dir = data
        self.unpinned = unpinned
        self.data_records: list[dict] = []

    def fetch(self, name: str) -> FetchedFile:
        """One of the protocol's data files, verified, recorded for the manifest."""
        spec = next((d for d in self.protocol.data if d.name == name), None)
        if spec is None:
            raise ComatError(f"benchmark '{self.name}' has no data file '{name}' in {PROTOCOLS_FILE}")
        got = fetch(spec, self.data_dir, unpinned=self.unpinned)
        self.data_records.append(got.record(spec))
        return got

    @property
    def toy(self) -> bool:
        return self.protocol.world == "toy"

    def option(self, key: str, default: Any, choices: Sequence | None = None) -> Any:
        """Benchmark option ``key`` (protocol or ``--option key=value``), checked against ``choices``; a boolean
        option also accepts the strings true/false that the command line gives."""
        value = self.protocol.options.get(key, default)
        if isinstance(default, bool) and isinstance(value, str):
            choices, value = (True, False), {"true": True, "false": False}.get(value.lower(), value)
        if choices is not None and value not in choices:
            shown = [str(c).lower() if isinstance(c, bool) else c for c in choices]
            raise ComatError(f"{self.name} option {key}={value!r} is unknown; use "
                             + " or ".join(f"--option {key}={c}" for c in shown))
        return value

    @abstractmethod
    def samples(self) -> list[Sample]:
        """All prompts, in the upstream order."""

    @abstractmethod
    def score(self, samples: Sequence[Sample], images: Sequence[Sequence[Path]], judges) -> list[dict]:
        """Per-image (or per-sample) records with at least ``id``, ``category`` and ``score``."""

    @abstractmethod
    def aggregate(self, records: Sequence[dict]) -> tuple[dict, list[dict]]:
        """The aggregate numbers and the table rows, computed as upstream does."""

    def write_outputs(self, out: Path, samples: Sequence[Sample], images: Sequence[Sequence[Path]]) -> dict[str, Path]:
        """Files a benchmark writes beside the standard run outputs (e.g. DPG-Bench's grids); none by default."""
        return {}
