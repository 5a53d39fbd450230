"""Resolve a model reference (hub id, local directory, or ``toy``) to a local directory.

Every loader goes through here, so a hub id, a path and the embedded toy zoo take one code path.
"""

from __future__ import annotations

import os
from pathlib import Path

from comat.core.errors import ComatError

TOY_ZOO = Path(__file__).resolve().parent.parent / "toy" / "zoo"


def _is_hub_id(ref: str) -> bool:
    parts = ref.split("/")
    return not ref.startswith((".", "/", "~")) and len(parts) in (1, 2) and all(parts)


def resolve_model_path(ref: str | os.PathLike, *, subfolder: str | None = None) -> Path:
    """Return a local directory holding the model ``ref``.

    ``toy`` and ``toy/<name>`` point into the committed toy zoo; an existing directory is used as is;
    anything of the form ``owner/name`` is looked up in the local Hugging Face cache (and downloaded
    only when the hub is reachable and ``HF_HUB_OFFLINE`` is unset).
    """
    ref = str(ref)
    if ref == "toy" or ref.startswith("toy/"):
        path = TOY_ZOO / (ref[4:] or "t2i")
        if not path.is_dir():
            have = ", ".join(sorted(p.name for p in TOY_ZOO.iterdir() if p.is_dir())) if TOY_ZOO.is_dir() else "nothing"
            raise ComatError(f"toy model '{ref}' is not in the zoo ({TOY_ZOO} has {have}); `comat toy pretrain` "
                             "builds the zoo's models, and the toy world has no others")
        return path / subfolder if subfolder else path
    path = Path(ref).expanduser()
    if path.is_dir():
        return path / subfolder if subfolder else path
    if path.exists():
        raise ComatError(f"model path '{ref}' is a file; pass the directory that holds its config and weights")
    if not _is_hub_id(ref):
        raise ComatError(f"model path '{ref}' does not exist; pass an existing directory or a hub id such as owner/name")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        local = snapshot_download(ref, allow_patterns=None)
    except HFValidationError as e:
        raise ComatError(f"model '{ref}' is neither a directory nor a valid hub id ({e})") from None
    except Exception as e:  # offline, missing repo, gated repo: all mean "not available here"
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        hint = (
            "the hub is offline (HF_HUB_OFFLINE=1); download it on a networked machine with "
            f"`huggingface-cli download {ref}` or pass a local directory"
            if offline
            else f"could not download it ({type(e).__name__}); check the id, your network, or pass a local directory"
        )
        raise ComatError(f"model '{ref}' is not in the local hub cache: {hint}") from None
    path = Path(local)
    return path / subfolder if subfolder else path
