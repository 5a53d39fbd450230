"""FID: feature extractors, Gaussian statistics with a reference-statistics cache, and the Frechet distance.

Extractors share one interface: called on a uint8 batch ``[B, 3, H, W]`` they return float32 features ``[B, D]``.

* ``inception-v3``: torch-fidelity's ``FeatureExtractorInceptionV3``, the standard FID network (TF-compatible
  Inception-v3 with the 2015-12-05 weights; it resizes to 299 px with TF1 bilinear itself), pool3 2048-d features.
  Its weights come from the torch hub cache (downloaded there when online, where torch-fidelity puts them);
  ``inception-v3:PATH`` names a local copy of the weights file instead.
* any CLIPModel directory or hub id (the toy world uses ``toy/clip``): the pooled output of the vision tower
  (post-layernorm [CLS] token, before the projection), taken where Inception's pool3 is, before the head.

Statistics are float64 mean and covariance (ddof 1, as TTUR / pytorch-fid / torch-fidelity); the distance is
computed in float64 with ``scipy.linalg.sqrtm`` as pytorch-fid does (non-finite root: retry with 1e-6 added to the
diagonals; complex root: real part kept when the diagonal's imaginary parts are below 1e-3, refused otherwise).
torch-fidelity 0.4 takes the trace from eigenvalues instead; the tests check both agree.

``python -m comat.judges.fid`` prints feature extraction throughput (images/s) at batch 32 for the toy extractor and an
Inception-v3 with random weights.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import io
import json
import time
import urllib.request
from abc import abstractmethod
from pathlib import Path
from typing import Callable, Iterable, Iterator
from unittest import mock

import numpy as np
import PIL.Image
import torch

from comat.core.errors import ComatError
from comat.core.io import atomic_write_bytes
from comat.core.runtime import cache_dir
from comat.judges.base import Judge

INCEPTION_REF = "inception-v3"
SQRTM_EPS = 1e-6
IMAGINARY_ATOL = 1e-3
RESAMPLE = PIL.Image.Resampling.BICUBIC


# --- Inception-v3 (torch-fidelity) ----------------------------------------------------------------------------

def is_inception_ref(ref: str) -> bool:
    return ref == INCEPTION_REF or ref.startswith(INCEPTION_REF + ":")


def inception_weights(ref: str = INCEPTION_REF) -> Path:
    """The weights file of an Inception reference: ``inception-v3`` (torch hub cache, downloaded when missing and
    online) or ``inception-v3:PATH``."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3 as url

    name = url.rsplit("/", 1)[1]
    hint = f"download {url} and pass it with --option inception_weights=PATH"
    if ref != INCEPTION_REF:
        path = Path(ref.removeprefix(INCEPTION_REF + ":")).expanduser()
        if not path.is_file():
            raise ComatError(f"FID Inception weights {path}: no such file; {hint}")
        return path
    path = Path(torch.hub.get_dir()) / "checkpoints" / name  # where torch-fidelity itself keeps them
    if path.is_file():
        return path
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            data = r.read()
    except OSError as e:
        raise ComatError(f"the FID Inception weights {name} are not in {path.parent} and could not be "
                         f"downloaded ({type(e).__name__}); {hint}") from None
    prefix = name.rsplit("-", 1)[1].split(".")[0]  # torch hub convention: the name ends in its sha256 prefix
    if not hashlib.sha256(data).hexdigest().startswith(prefix):
        raise ComatError(f"the download of {url} is corrupt (sha256 does not start with {prefix}); {hint}")
    return atomic_write_bytes(path, data)


def _torch_fidelity_inception(state: dict | None):
    from torch_fidelity import feature_extractor_inceptionv3 as tfi

    # The constructor fetches its weights itself: by URL through torch.hub, or from a path with
    # torch.load(weights_only=False), both of which unpickle. We load the state dict with weights_only=True and hand
    # it over as the "download"; state None keeps the fresh random initialisation (throughput measurements).
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(tfi, "load_state_dict_from_url", lambda *a, **k: state))
        if state is None:
            stack.enter_context(mock.patch.object(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda *a: None))
        return tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])


class FidFeatures(Judge):
    """The ``fid_features`` role: the standard FID Inception-v3 for an Inception reference, else a CLIP vision
    tower (the toy world's). Called on uint8 ``[B, 3, H, W]``, it returns float32 ``[B, dims]``."""

    dims: int
    description: str

    @abstractmethod
    def __call__(self, images: torch.Tensor) -> np.ndarray: ...

    @classmethod
    def load(cls, ref: str, *, device: str | torch.device = "cpu") -> "FidFeatures":
        return load_extractor(ref, device)

    @classmethod
    def fingerprint(cls, ref: str) -> str:
        """sha256 of the Inception weights file, or of the CLIP model's files."""
        from comat.models.fingerprint import file_sha256, model_fingerprint

        return file_sha256(inception_weights(ref)) if is_inception_ref(ref) else model_fingerprint(ref)


class InceptionFeatures(FidFeatures):
    """The standard FID Inception-v3, pool3 features."""

    dims = 2048

    def __init__(self, weights: Path | None, device: str | torch.device = "cpu"):
        state = None
        if weights is not None:
            try:
                state = torch.load(weights, map_location="cpu", weights_only=True)
            except Exception as e:  # not a torch file, or one holding more than tensors
                raise ComatError(f"FID Inception weights {weights}: not a plain torch state dict ({type(e).__name__}); "
                                 "pass torch-fidelity's weights-inception-2015-12-05-6726825d.pth") from None
        try:
            self.net = _torch_fidelity_inception(state).to(device)
        except RuntimeError as e:  # load_state_dict: missing / unexpected keys, wrong shapes
            first = str(e).splitlines()[0]
            raise ComatError(f"FID Inception weights {weights}: not torch-fidelity's Inception-v3 ({first}); "
                             "pass its weights-inception-2015-12-05-6726825d.pth") from None
        self.description = ("torch-fidelity Inception-v3 (TF 2015-12-05 weights), pool3 2048-d" if weights
                            else "Inception-v3 with random weights (throughput only)")

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        device = next(self.net.parameters()).device
        return self.net(images.to(device))[0].float().cpu().numpy()


# --- CLIP vision tower (the toy world's extractor) ------------------------------------------------------------

class ClipVisionFeatures(FidFeatures):
    """Pooled output of a CLIP vision tower (post-layernorm [CLS], before the projection)."""

    def __init__(self, ref: str, device: str | torch.device = "cpu"):
        from comat.judges.clip import ClipJudge

        judge = ClipJudge.load(ref, device=device)  # its architecture check and processor
        self.vision = judge.model.vision_model
        self.processor = judge.processor.image_processor
        self.dims = judge.model.config.vision_config.hidden_size
        self.description = f"CLIP vision tower of {ref}, pooled output {self.dims}-d"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        arrays = list(images.permute(0, 2, 3, 1).cpu().numpy())
        pixels = self.processor(images=arrays, return_tensors="pt").pixel_values
        device = next(self.vision.parameters()).device
        return self.vision(pixel_values=pixels.to(device)).pooler_output.float().cpu().numpy()


def load_extractor(ref: str, device: str | torch.device = "cpu") -> FidFeatures:
    if is_inception_ref(ref):
        return InceptionFeatures(inception_weights(ref), device)
    return ClipVisionFeatures(ref, device)


# --- images and features --------------------------------------------------------------------------------------

def centre_crop_resize(image: PIL.Image.Image | np.ndarray, size: int) -> np.ndarray:
    """The real-image preprocessing: the largest centred square, resized to ``size`` with PIL bicubic (antialiased);
    uint8 ``[size, size, 3]``. An image already square at ``size`` is returned unchanged."""
    im = PIL.Image.fromarray(image) if isinstance(image, np.ndarray) else image
    im = im.convert("RGB")
    w, h = im.size
    s = min(w, h)
    if (w, h) != (s, s):
        left, top = (w - s) // 2, (h - s) // 2
        im = im.crop((left, top, left + s, top + s))
    if s != size:
        im = im.resize((size, size), RESAMPLE)
    return np.asarray(im, dtype=np.uint8)


PREPROCESSING = "centre crop to a square, PIL bicubic resize to {size}x{size}, RGB uint8"


def to_batch(arrays: Iterable[np.ndarray]) -> torch.Tensor:
    """HWC uint8 arrays -> ``[B, 3, H, W]`` uint8."""
    return torch.from_numpy(np.stack(list(arrays))).permute(0, 3, 1, 2).contiguous()


def batched(items: Iterable, size: int) -> Iterator[list]:
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def extract(extractor: FidFeatures, images: Iterable[np.ndarray], batch_size: int = 32) -> np.ndarray:
    """Features of HWC uint8 images, float32 ``[N, D]``."""
    chunks = [extractor(to_batch(b)) for b in batched(images, batch_size)]
    return np.concatenate(chunks) if chunks else np.zeros((0, extractor.dims), np.float32)


def encode_features(row: np.ndarray) -> str:
    """One feature vector as a JSON-safe string (float32 bytes in base64: 11 KB for Inception, not 40 KB of text)."""
    return base64.b64encode(np.asarray(row, dtype="<f4").tobytes()).decode("ascii")


def decode_features(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f4")


# --- statistics and the distance ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Statistics:
    mu: np.ndarray  # float64 [D]
    sigma: np.ndarray  # float64 [D, D]
    n: int

    @classmethod
    def of(cls, features: np.ndarray) -> "Statistics":
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2 or len(f) < 2:
            raise ComatError(f"FID needs at least 2 feature vectors to estimate a covariance; got shape {f.shape}")
        return cls(f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False)), len(f))

    def save(self, path: Path, meta: dict) -> Path:
        buf = io.BytesIO()
        np.savez(buf, mu=self.mu, sigma=self.sigma, n=np.int64(self.n), meta=np.str_(json.dumps(meta, sort_keys=True)))
        return atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: Path) -> "Statistics":
        with np.load(path, allow_pickle=False) as z:
            return cls(z["mu"], z["sigma"], int(z["n"]))


def frechet_distance(a: Statistics, b: Statistics) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) in float64, as pytorch-fid computes it."""
    from scipy import linalg

    mu1, mu2 = np.asarray(a.mu, np.float64), np.asarray(b.mu, np.float64)
    s1, s2 = np.asarray(a.sigma, np.float64), np.asarray(b.sigma, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ComatError(f"FID statistics differ in dimension ({mu1.shape[0]} vs {mu2.shape[0]}); "
                         "both sides must come from the same feature extractor")
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():  # singular product (fewer samples than dimensions): regularise as upstream
        offset = np.eye(len(s1)) * SQRTM_EPS
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=IMAGINARY_ATOL):
            raise ComatError(f"FID: sqrtm(S_a S_b) has an imaginary component of {np.abs(covmean.imag).max():.3g}; "
                             f"the covariances are too ill-conditioned ({a.n} and {b.n} samples for {len(s1)} dims)")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def statistics_key(extractor_id: str, data_key: str, preprocessing: str) -> str:
    payload = {"extractor": extractor_id, "data": data_key, "preprocessing": preprocessing}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def cached_statistics(extractor_id: str, data_key: str, preprocessing: str,
                      features: Callable[[], np.ndarray]) -> tuple[Statistics, int]:
    """Reference statistics from ``$COMAT_CACHE/fid-stats`` keyed by extractor, data sample and preprocessing, or
    computed by ``features()`` and stored. Returns the statistics and how many features were computed (0: cached)."""
    key = statistics_key(extractor_id, data_key, preprocessing)
    path = cache_dir() / "fid-stats" / f"{key}.npz"
    if path.is_file():
        return Statistics.load(path), 0
    stats = Statistics.of(features())
    stats.save(path, {"extractor": extractor_id, "data": data_key, "preprocessing": preprocessing})
    return stats, stats.n


# --- throughput (performance figure) --------------------------------------------------------------------------

def throughput(extractor: FidFeatures, size: int, batch_size: int = 32, rounds: int = 3) -> tuple[float, float]:
    """Images per second through ``extractor`` on random uint8 batches of ``size`` px, after one warm-up batch: by
    wall clock, and per second of this process's CPU time (what an uncontended machine would give; on a shared
    machine the two differ by the share of the cores this process got)."""
    x = torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8)
    extractor(x)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(rounds):
        extractor(x)
    n = rounds * batch_size
    return n / (time.perf_counter() - wall), n / (time.process_time() - cpu)


def main() -> None:
    from comat.core.runtime import configure_threads

    configure_threads()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    setting = f"batch 32, {device}, torch threads {torch.get_num_threads()}"
    runs = ((load_extractor("toy/clip", device), 64, 20), (InceptionFeatures(None, device), 512, 2))
    for extractor, size, rounds in runs:
        wall, cpu = throughput(extractor, size, rounds=rounds)
        print(f"{extractor.description}: {wall:.2f} images/s wall clock, {cpu:.2f} images per CPU second "
              f"({setting}, {size} px input)")


if __name__ == "__main__":
    main()
