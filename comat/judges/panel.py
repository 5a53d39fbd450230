"""The panel of judges of one benchmark run, by role, loaded on first use and answering through the judge cache.

A judge's cache id is its role, its reference and the fingerprint of its weights, so a retrained toy judge
or a new hub revision never reuses old answers. Images are identified by the sha256 of their PNG bytes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

from comat.core.errors import ComatError
from comat.core.registry import Registry
from comat.generation.engine import image_sha256, load_image, to_tensor
from comat.judges.base import Judge
from comat.judges.cache import JudgeCache

# Roles a protocol can name, each with its judge class, imported on first use.
JUDGES: Registry[type[Judge]] = Registry("judge role", entries={
    "vqa": "comat.judges.vqa:VqaJudge",
    "detector": "comat.judges.detector:Detector",
    "clip": "comat.judges.clip:ClipJudge",
    "fid_features": "comat.judges.fid:FidFeatures",
    "text_embedder": "comat.judges.text_embedder:TextEmbedder",
})


class Judges:
    def __init__(self, refs: dict[str, str], *, cache: JudgeCache | None = None, device: str = "cpu"):
        self.refs = dict(refs)
        self.cache = cache or JudgeCache()
        self.device = device
        self._models: dict[str, Any] = {}
        self._ids: dict[str, str] = {}
        self._image_sha: dict[Path, str] = {}

    def ref(self, role: str) -> str:
        if role not in self.refs:
            raise ComatError(f"this benchmark's protocol names no '{role}' judge; add it under judges: in the protocol")
        return self.refs[role]

    def model(self, role: str) -> Any:
        if role not in self._models:
            self._models[role] = JUDGES.get(role).load(self.ref(role), device=self.device)
        return self._models[role]

    def id(self, role: str) -> str:
        if role not in self._ids:
            fingerprint = JUDGES.get(role).fingerprint(self.ref(role))
            self._ids[role] = f"{role}:{self.ref(role)}@{fingerprint[:16]}"
        return self._ids[role]

    def versions(self) -> dict[str, str]:
        """Every judge this run used, with its weight fingerprint (for the manifest)."""
        return {role: self.id(role) for role in self._ids}

    def image_id(self, path: Path) -> str:
        if path not in self._image_sha:
            self._image_sha[path] = image_sha256(path)
        return self._image_sha[path]

    def cached(self, role: str, task: str, paths: Sequence[Path], questions: Sequence[str],
               compute: Callable[[list[Path], list[str]], list[Any]], batch_size: int = 64) -> list[Any]:
        """``compute(paths, questions)`` through the cache; the cache key holds ``task`` beside the judge id."""
        by_sha = {self.image_id(p): p for p in paths}
        items = [(self.image_id(p), q) for p, q in zip(paths, questions)]

        def run(todo: list[tuple[str, str]]) -> list[Any]:
            out: list[Any] = []
            for i in range(0, len(todo), batch_size):
                chunk = todo[i : i + batch_size]
                out += compute([by_sha[s] for s, _ in chunk], [q for _, q in chunk])
            return out

        return self.cache.get_or_compute(f"{self.id(role)}|{task}", items, run)

    # -- the questions benchmarks ask -------------------------------------------------------------------

    def yes_probability(self, paths: Sequence[Path], questions: Sequence[str]) -> list[float]:
        vqa = lambda ps, qs: self.model("vqa").yes_probability(to_tensor([load_image(p) for p in ps]), qs).tolist()  # noqa: E731
        return self.cached("vqa", "yes_probability", paths, questions, vqa)

    def answer(self, paths: Sequence[Path], questions: Sequence[str]) -> list[str]:
        vqa = lambda ps, qs: self.model("vqa").answer(to_tensor([load_image(p) for p in ps]), qs)  # noqa: E731
        return self.cached("vqa", "answer", paths, questions, vqa)

    def detect(self, paths: Sequence[Path], labels: Sequence[str]) -> list[list[tuple[str, float, list[float]]]]:
        """Detections of ``labels`` in each image: ``[label, score, [x0, y0, x1, y1]]`` best first."""
        query = json.dumps(list(labels))

        def run(ps: list[Path], _qs: list[str]) -> list[Any]:
            found = self.model("detector").detect([load_image(p) for p in ps], list(labels))
            return [[[lab, score, list(box)] for lab, score, box in dets] for dets in found]

        return self.cached("detector", "detect", paths, [query] * len(paths), run, batch_size=16)

    def clip_similarity(self, paths: Sequence[Path], texts: Sequence[str]) -> list[float]:
        clip = lambda ps, ts: self.model("clip").similarity([load_image(p) for p in ps], ts)  # noqa: E731
        return self.cached("clip", "cosine", paths, texts, clip)
