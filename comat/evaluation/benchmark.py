"""What a benchmark is: its protocol (everything that makes a number comparable), its samples, and the adapter that
loads them, scores generated images with the official formula and aggregates as upstream does.

A protocol entry fixes data version, images per prompt, seeds, sampler and judges; its ``toy`` block overrides
fields for the toy world, whose judges stand in for the real ones in the same architectures, so an adapter's
scoring code is the same in both worlds.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

from comat.core.errors import ComatError
from comat.evaluation.data import DataFile, FetchedFile, fetch
from comat.generation.engine import ImageJob, SamplerSettings

if TYPE_CHECKING:
    from comat.evaluation.runner import RunContext


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


class Benchmark(ABC):
    """Load the benchmark's samples, score generated images with the official formula, aggregate as upstream.

    :meth:`run` is what ``comat eval`` calls between selecting samples and writing outputs: by default it generates
    the protocol's images per sample and scores them. A benchmark that does more (the prompt attack optimises
    prompts between two generations) or that scores something other than generated images (captioner sensitivity
    scores captions of given images) overrides it and says what else the manifest must hold in
    ``protocol_extra`` (printed beside the numbers) and ``manifest_extra``.
    """

    name: ClassVar[str]

    def __init__(self, protocol: Protocol, *, data: Path | None = None, unpinned: bool = False):
        self.protocol = protocol
        self.data_dir = data
        self.unpinned = unpinned
        self.data_records: list[dict] = []
        self.notes: list[str] = []
        self.images: list[list[Path]] = []  # per sample, the images run() generated
        self.protocol_extra: dict[str, Any] = {}
        self.manifest_extra: dict[str, Any] = {}

    def fetch(self, name: str) -> FetchedFile:
        """One of the protocol's data files, verified, recorded for the manifest."""
        spec = next((d for d in self.protocol.data if d.name == name), None)
        if spec is None:
            raise ComatError(f"benchmark '{self.name}' has no data file '{name}' in its protocol entry")
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

    def generate(self, samples: Sequence[Sample], ctx: "RunContext") -> list[list[Path]]:
        """The protocol's images of every sample (``self.images``), from the cache or the engine."""
        seeds = self.protocol.seeds()
        paths = ctx.engine.generate([ImageJob(s.prompt, seed) for s in samples for seed in seeds], progress=True)
        self.images = [paths[i * len(seeds) : (i + 1) * len(seeds)] for i in range(len(samples))]
        return self.images

    def run(self, samples: Sequence[Sample], ctx: "RunContext") -> list[dict] | None:
        """The run's records; None on a process that only shared the generation (the main process scores)."""
        self.generate(samples, ctx)
        if not ctx.is_main_process:  # scoring is cheap next to generation
            return None
        return self.score(samples, self.images, ctx.judges)

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
