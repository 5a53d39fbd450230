"""Official benchmark files: the pinned upstream file (downloaded once, sha256-verified) or a local copy (``--data``).

``--data`` may name the file itself or a directory holding it under its upstream name. A file whose sha256 is
not the pinned one is refused unless the user says ``--unpinned``; the manifest records which was used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import urllib.request
from pathlib import Path

from comat.core.errors import ComatError
from comat.core.io import atomic_write_bytes
from comat.core.runtime import cache_dir


@dataclasses.dataclass(frozen=True)
class DataFile:
    name: str  # upstream file name, also the name looked for under --data
    url: str
    sha256: str | None = None  # None: upstream file we have never seen; first use records it (manifest says so)


@dataclasses.dataclass(frozen=True)
class FetchedFile:
    path: Path
    sha256: str
    pinned: bool

    def record(self, spec: DataFile) -> dict:
        return {"name": spec.name, "url": spec.url, "path": str(self.path), "sha256": self.sha256,
                "pinned_sha256": spec.sha256, "verified": self.pinned}


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def fetch(spec: DataFile, data: Path | None = None, *, unpinned: bool = False) -> FetchedFile:
    if data is not None:
        data = Path(data).expanduser()
        path = data / spec.name if data.is_dir() else data
        if not path.is_file():
            raise ComatError(f"--data {data}: no file '{spec.name}' there; pass the upstream file or its directory")
    else:
        path = cache_dir() / "data" / (spec.sha256 or "unpinned")[:16] / spec.name
        if not path.is_file():
            try:
                with urllib.request.urlopen(spec.url, timeout=60) as r:
                    atomic_write_bytes(path, r.read())
            except OSError as e:
                raise ComatError(f"could not download {spec.name} from {spec.url} ({type(e).__name__}); "
                                 f"download it elsewhere and pass --data PATH") from None
    digest = sha256_of(path)
    if spec.sha256 is not None and digest != spec.sha256 and not unpinned:
        raise ComatError(f"{path}: sha256 {digest[:12]}... is not the pinned {spec.sha256[:12]}... of {spec.name} "
                         f"({spec.url}); pass the pinned file, or --unpinned to score this one (recorded as unverified)")
    return FetchedFile(path, digest, spec.sha256 is not None and digest == spec.sha256)
