"""COCO FID-10K: FID of one generated image per caption against the captions' real images.

Real world. ``--data DIR`` is a directory holding the COCO 2014 validation annotations and images as their zips
unpack::

    DIR/annotations/captions_val2014.json   (annotations_trainval2014.zip)
    DIR/val2014/COCO_val2014_000000000042.jpg ...   (val2014.zip)

(``--data`` may also name the JSON itself, with ``val2014/`` beside its folder; ``--option images=DIR`` points
elsewhere). ``sample_size`` (10,000) images are drawn without replacement from the captioned images with
``numpy.random.default_rng(sample_seed)`` over the sorted image ids, and one caption per image from the same
generator, skipping captions already drawn so every prompt (and so every generated image: the engine keys images
by prompt and seed) is distinct. Captions have their whitespace collapsed. The whole drawn sample (image id,
caption id, caption, file name) is written to ``coco-fid.sample.jsonl`` beside the run's outputs, its sha256 to the
manifest; the per-sample JSONL has the pairs that were generated (all of them unless ``--limit``).

Real images are centre-cropped to a square and resized with PIL bicubic to the generation resolution (512); the
generated images go through the same function (a no-op at 512). Features: ``judges.fid_features`` (torch-fidelity
Inception-v3, 2048-d pool3; ``--option inception_weights=PATH`` for a local weights file). Generated-image features
are cached in the judge cache per image; the reference statistics in ``$COMAT_CACHE/fid-stats``, keyed by the
extractor's fingerprint, the sample (file names and sizes) and the preprocessing.

Toy world: the reference is ``sample_size`` (1,000) toy renders with distinct captions (the first distinct
captions of ``caption_pairs(2 * sample_size, sample_seed)``, training-split prompts), the extractor the pooled
output of toy/clip's vision tower, the same code otherwise.

FID has no per-sample score: the JSONL records name the captions and images, the number is in the aggregate.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import PIL.Image

from comat.core.errors import ComatError
from comat.core.results import write_jsonl
from comat.evaluation.benchmark import Benchmark, Sample
from comat.evaluation.registry import register
from comat.generation.engine import load_image
from comat.judges.fid import (
    INCEPTION_REF,
    PREPROCESSING,
    Statistics,
    cached_statistics,
    centre_crop_resize,
    decode_features,
    encode_features,
    extract,
    frechet_distance,
    inception_weights,
    is_inception_ref,
    to_batch,
)

ROLE = "fid_features"
ANNOTATIONS = "annotations/captions_val2014.json"
IMAGES_URL = "http://images.cocodataset.org/zips/val2014.zip"
LAYOUT = (f"DIR/{ANNOTATIONS} and DIR/val2014/*.jpg, from annotations_trainval2014.zip and {IMAGES_URL} unpacked "
          "into DIR")
EXPECTED = "COCO captions JSON {'images': [{'id', 'file_name'}], 'annotations': [{'id', 'image_id', 'caption'}]}"
BATCH = 32


def _field(entry: Any, key: str, path: Path, where: str, kind: type) -> Any:
    try:
        return kind(entry[key])
    except (KeyError, TypeError, ValueError):
        raise ComatError(f"{path}: {where} has no {kind.__name__} '{key}'; expected {EXPECTED}") from None


def read_coco_captions(path: Path) -> tuple[dict[int, str], dict[int, list[tuple[int, str]]]]:
    """``(file name by image id, [(caption id, caption)] by image id)`` from a COCO captions file, checked."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ComatError(f"{path}: not UTF-8 text; expected {EXPECTED}") from None
    except json.JSONDecodeError as e:
        raise ComatError(f"{path}: not JSON (line {e.lineno}: {e.msg}); expected {EXPECTED}") from None
    for key in ("images", "annotations"):
        if not isinstance(raw, dict) or not isinstance(raw.get(key), list):
            raise ComatError(f"{path}: no '{key}' list at the top level; expected {EXPECTED}")
    files = {_field(im, "id", path, f"images[{i}]", int): _field(im, "file_name", path, f"images[{i}]", str)
             for i, im in enumerate(raw["images"])}
    captions: dict[int, list[tuple[int, str]]] = defaultdict(list)
    for i, ann in enumerate(raw["annotations"]):
        image = _field(ann, "image_id", path, f"annotations[{i}]", int)
        if image not in files:
            raise ComatError(f"{path}: annotations[{i}].image_id {image} is not among 'images'; expected {EXPECTED}")
        text = " ".join(_field(ann, "caption", path, f"annotations[{i}]", str).split())
        captions[image].append((_field(ann, "id", path, f"annotations[{i}]", int), text))
    return files, captions


def draw_coco_sample(path: Path, n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` distinct images, one distinct caption each, drawn reproducibly; sorted by image id."""
    files, captions = read_coco_captions(path)
    ids = sorted(image for image, caps in captions.items() if caps)
    if len(ids) < n:
        raise ComatError(f"{path}: {len(ids)} captioned images, fewer than sample_size={n}; pass the full "
                         f"captions_val2014.json or a smaller --option sample_size")
    rng = np.random.default_rng(seed)
    used: set[str] = set()
    out = []
    for image in sorted(ids[i] for i in rng.choice(len(ids), size=n, replace=False)):
        caps = sorted(captions[image])
        order = rng.permutation(len(caps))
        caption_id, text = next((caps[j] for j in order if caps[j][1] not in used), caps[order[0]])
        used.add(text)
        out.append({"image_id": image, "caption_id": caption_id, "caption": text, "file_name": files[image]})
    return out


def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


@register
class CocoFid(Benchmark):
    name = "coco-fid"

    def __init__(self, protocol, **kwargs):
        super().__init__(protocol, **kwargs)
        try:
            self.sample_size = int(protocol.options.get("sample_size", 10000))
            self.sample_seed = int(protocol.options.get("sample_seed", 0))
        except ValueError:
            raise ComatError("coco-fid options sample_size and sample_seed must be integers, e.g. "
                             "--option sample_size=1000") from None
        if self.sample_size < 2:
            raise ComatError(f"coco-fid option sample_size={self.sample_size}: FID needs at least 2 images")
        if not protocol.sampler.resolution:
            raise ComatError("the coco-fid protocol needs sampler.resolution (real images are resized to it)")
        self.resolution = int(protocol.sampler.resolution)
        self.preprocessing = PREPROCESSING.format(size=self.resolution)
        self._reference: list[Any] = []  # toy: uint8 arrays; real: image paths
        self._data_key = ""
        self._ref = ""
        self._drawn: list[dict[str, Any]] = []  # the whole drawn sample, written beside the run's outputs
        self._result: dict[str, Any] | None = None

    # -- the sample --------------------------------------------------------------------------------------

    def samples(self) -> list[Sample]:
        self._ref = self.extractor_ref()
        return self._toy_samples() if self.toy else self._coco_samples()

    def _toy_samples(self) -> list[Sample]:
        from comat.toy.world import caption_pairs

        images, captions = caption_pairs(2 * self.sample_size, self.sample_seed)
        first: list[int] = []  # the first occurrence of each caption, so no two prompts share a generated image
        seen: set[str] = set()
        for i, caption in enumerate(captions):
            if caption not in seen and len(first) < self.sample_size:
                seen.add(caption)
                first.append(i)
        if len(first) < self.sample_size:
            self.notes.append(f"only {len(first)} distinct toy captions in {2 * self.sample_size} draws")
        self._reference = [images[i] for i in first]
        self._data_key = hashlib.sha256(np.ascontiguousarray(images[first]).tobytes()).hexdigest()
        self.data_records.append({"name": "toy caption_pairs", "seed": self.sample_seed, "draws": 2 * self.sample_size,
                                  "pairs": len(first), "sha256": self._data_key})
        self._drawn = [{"index": i, "caption": captions[i]} for i in first]
        return [Sample(f"toy-{i:05d}", captions[i], "toy", {"index": i}) for i in first]

    def _coco_samples(self) -> list[Sample]:
        if self.data_dir is None:
            raise ComatError(f"coco-fid needs the COCO 2014 validation set: pass --data DIR with {LAYOUT}")
        annotations = self.fetch(ANNOTATIONS).path
        root = Path(self.data_dir) if Path(self.data_dir).is_dir() else annotations.parent.parent
        images_dir = Path(self.protocol.options.get("images") or root / "val2014").expanduser()
        pairs = draw_coco_sample(annotations, self.sample_size, self.sample_seed)
        self._reference, sizes = [], []
        for p in pairs:
            path = images_dir / p["file_name"]
            if not path.is_file():
                raise ComatError(f"{path}: missing (file_name of image {p['image_id']} in {annotations}); expected "
                                 f"{LAYOUT}, or --option images=DIR")
            self._reference.append(path)
            sizes.append([p["file_name"], path.stat().st_size])
        self._data_key = _sha256_json(sizes)  # which images, and a cheap check that they are the same files
        self.data_records.append({"name": "val2014 images", "url": IMAGES_URL, "path": str(images_dir),
                                  "sha256": None, "verified": False})
        self.data_records.append({"name": "sample", "year": "val2014", "size": len(pairs), "seed": self.sample_seed,
                                  "sha256": _sha256_json([[p["image_id"], p["caption_id"]] for p in pairs]),
                                  "ids": "every pair in coco-fid.sample.jsonl"})
        self._drawn = pairs
        return [Sample(str(p["caption_id"]), p["caption"], "val2014",
                       {"image_id": p["image_id"], "file_name": p["file_name"]}) for p in pairs]

    def _reference_images(self) -> Iterator[np.ndarray]:
        for item in self._reference:
            if isinstance(item, np.ndarray):
                yield centre_crop_resize(item, self.resolution)
                continue
            try:
                with PIL.Image.open(item) as im:
                    yield centre_crop_resize(im, self.resolution)
            except (OSError, SyntaxError) as e:
                raise ComatError(f"{item}: unreadable image ({type(e).__name__}); re-extract it from "
                                 f"{IMAGES_URL}") from None

    # -- scoring -----------------------------------------------------------------------------------------

    def extractor_ref(self) -> str:
        """The protocol's ``fid_features`` reference with ``--option inception_weights`` applied. Resolving it finds
        (or downloads) the Inception weights, so ``samples()`` calls it: a missing file stops the run before any
        image is generated."""
        ref = self.protocol.judges.get(ROLE)
        if ref is None:
            raise ComatError(f"the coco-fid protocol names no '{ROLE}' judge; add one under judges:")
        weights = self.protocol.options.get("inception_weights")
        if weights:
            if ref != INCEPTION_REF:
                raise ComatError(f"--option inception_weights applies to the {INCEPTION_REF} extractor, but this "
                                 f"run's {ROLE} judge is {ref}")
            ref = f"{INCEPTION_REF}:{inception_weights(f'{INCEPTION_REF}:{weights}').resolve()}"
        if is_inception_ref(ref):
            inception_weights(ref)
        return ref

    def generated_features(self, paths: Sequence[Path], judges) -> np.ndarray:
        def compute(ps: list[Path], _questions: list[str]) -> list[str]:
            batch = to_batch([centre_crop_resize(load_image(p), self.resolution) for p in ps])
            return [encode_features(f) for f in judges.model(ROLE)(batch)]

        values = judges.cached(ROLE, f"features|{self.preprocessing}", paths, [""] * len(paths), compute, BATCH)
        return np.stack([decode_features(v) for v in values])

    def score(self, samples: Sequence[Sample], images: Sequence[Sequence[Path]], judges) -> list[dict]:
        if not self._reference:
            raise RuntimeError("coco-fid: score() before samples(); the reference set is drawn by samples()")
        judges.refs[ROLE] = self._ref  # the same reference, or inception-v3:PATH for --option inception_weights
        seeds = self.protocol.seeds()
        records = [{"id": s.id, "category": s.category, "prompt": s.prompt, **s.meta, "seed": seed, "image": str(p)}
                   for s, ps in zip(samples, images) for seed, p in zip(seeds, ps)]
        generated = Statistics.of(self.generated_features([Path(r["image"]) for r in records], judges))
        reference, computed = cached_statistics(
            judges.id(ROLE), self._data_key, self.preprocessing,
            lambda: extract(judges.model(ROLE), self._reference_images(), BATCH))
        self._result = {"fid": frechet_distance(generated, reference), "generated": generated.n,
                        "reference": reference.n, "dims": int(reference.mu.shape[0]), "computed": computed}
        how = "computed" if computed else "reused from the cache"
        self.notes.append(f"reference statistics of {reference.n} images {how}; preprocessing: {self.preprocessing}; "
                          f"features: {judges.id(ROLE)} ({self._result['dims']}-d)")
        return records

    def write_outputs(self, out: Path, samples: Sequence[Sample], images: Sequence[Sequence[Path]]) -> dict[str, Path]:
        """The whole drawn sample (also when ``--limit`` generated for part of it): ids, captions, file names."""
        return {"sample": write_jsonl(Path(out) / f"{self.name}.sample.jsonl", self._drawn)}

    def aggregate(self, records: Sequence[dict]) -> tuple[dict, list[dict]]:
        if self._result is None:
            raise RuntimeError("coco-fid: aggregate() before score(); FID comes from the scored feature statistics")
        r = self._result
        aggregate = {"scores": {"fid": r["fid"]}, "generated_images": r["generated"],
                     "reference_images": r["reference"], "feature_dims": r["dims"],
                     "reference_features_computed": r["computed"], "preprocessing": self.preprocessing}
        row = {"fid": r["fid"], "generated": r["generated"], "reference": r["reference"], "resolution": self.resolution,
               "feature_dims": r["dims"]}
        return aggregate, [row]
