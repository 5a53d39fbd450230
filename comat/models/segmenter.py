"""Open-vocabulary noun segmentation for attribute concentration (paper: Grounded-SAM).

GroundingDINO (transformers) finds boxes for the prompt's entity nouns; SAM (``segment_anything``)
turns each noun's box into a mask. The official CoMat code uses FastSAM for the second stage; the
paper names Grounded-SAM, which is what is built here.

Each noun gets the mask of its single highest-scoring box: the loss attends to "the" entity the noun
names, and a union over every box that mentions the noun would also swallow boxes GroundingDINO
grounded on a neighbouring noun (its labels are thresholded token spans, which may cover two nouns).

SAM weights load from ``.safetensors`` or, for the official ``.pth`` checkpoints, through
``torch.load(weights_only=True)``; nothing is ever unpickled freely. A small SAM of any shape (the toy
world trains one) is stored as a directory with ``sam_config.json`` + ``model.safetensors``
(see :func:`save_sam`) and loaded with ``sam_type="custom"``.
"""

from __future__ import annotations

import inspect
import json
import os
import pickle
import re
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from comat.core.errors import ComatError
from comat.models.hub import resolve_model_path

SAM_CONFIG_NAME = "sam_config.json"
SAM_WEIGHTS_NAME = "model.safetensors"
_PICKLE_SUFFIXES = (".pth", ".pt", ".bin")
_WEIGHT_SUFFIXES = (".safetensors",) + _PICKLE_SUFFIXES

# Defaults are the ViT-B SAM (segment_anything.build_sam); a custom config overrides any of them.
# ``out_chans`` is SAM's prompt embedding dim: the image encoder output feeds the mask decoder directly.
SAM_CONFIG_DEFAULTS: dict = {
    "img_size": 1024,
    "patch_size": 16,
    "embed_dim": 768,
    "depth": 12,
    "num_heads": 12,
    "mlp_ratio": 4.0,
    "out_chans": 256,
    "use_rel_pos": True,
    "window_size": 14,
    "global_attn_indexes": [2, 5, 8, 11],
    "mask_in_chans": 16,
    "decoder_depth": 2,
    "decoder_mlp_dim": 2048,
    "decoder_num_heads": 8,
    "num_multimask_outputs": 3,
    "iou_head_depth": 3,
    "iou_head_hidden_dim": 256,
    "pixel_mean": [123.675, 116.28, 103.53],
    "pixel_std": [58.395, 57.12, 57.375],
}

_SPECIAL_TOKEN = re.compile(r"\[(cls|sep|pad|unk|mask)\]|<[^>]*>")


# --------------------------------------------------------------------------- label -> noun mapping


def _words(text: str) -> list[str]:
    """Lower-cased alphanumeric words of a noun or of a decoded GroundingDINO label."""
    text = _SPECIAL_TOKEN.sub(" ", text.lower())
    # A label decoded from a lone word-piece keeps its "##" marker; it is still a fragment of a noun.
    text = text.replace(" ##", "").replace("##", "")
    return re.findall(r"[^\W_]+", text)


def _runs(needle: list[str], hay: list[str]) -> list[tuple[int, int]]:
    n = len(needle)
    return [(i, i + n) for i in range(len(hay) - n + 1) if n and hay[i : i + n] == needle]


def match_label(label: str, nouns: Sequence[str]) -> list[int]:
    """Indices of the nouns a detected GroundingDINO label refers to (may be several or none).

    The label is the decoded text of the query tokens that passed ``text_threshold`` for a box, so it
    consists of pieces of the query nouns (and separators). A noun matches when all its words occur as
    a contiguous run in the label ("red car" -> "car"); a run lying inside another matched noun's run is
    not a separate match ("traffic light" names "traffic light", not also "light"). When no noun is
    named whole, the label is a fragment (one word of "traffic light", one word-piece of "skateboard")
    and every noun containing that fragment matches.
    """
    words = _words(label)
    if not words:
        return []
    noun_words = [_words(n) for n in nouns]
    runs = {i: _runs(nw, words) for i, nw in enumerate(noun_words)}
    spans = [(s, e) for rs in runs.values() for s, e in rs]
    full = [
        i
        for i, rs in runs.items()
        if any(not any(s2 <= s and e <= e2 and (e2 - s2) > (e - s) for s2, e2 in spans) for s, e in rs)
    ]
    if full:
        return full
    return [i for i, nw in enumerate(noun_words) if nw and all(w in " ".join(nw) for w in words)]


def best_box_per_noun(
    nouns: Sequence[str], boxes: torch.Tensor, scores: torch.Tensor, labels: Sequence[str]
) -> list[torch.Tensor | None]:
    """For each noun, the highest-scoring box whose label refers to it (see :func:`match_label`); None if none does.

    ``boxes`` [N, 4] (x0, y0, x1, y1), ``scores`` [N] and ``labels`` (N strings) are one image's result of
    ``GroundingDinoProcessor.post_process_grounded_object_detection``. A box whose label names two nouns
    counts for both: GroundingDINO gives no way to split it.
    """
    if not (len(boxes) == len(scores) == len(labels)):
        raise ValueError(f"boxes, scores and labels differ in length: {len(boxes)}, {len(scores)}, {len(labels)}")
    best: list[torch.Tensor | None] = [None] * len(nouns)
    best_score = [float("-inf")] * len(nouns)
    for box, score, label in zip(boxes, scores.tolist(), labels):
        for i in match_label(label, nouns):
            if score > best_score[i]:
                best[i], best_score[i] = box, score
    return best


def detection_query(nouns: Sequence[str]) -> str:
    """GroundingDINO's caption convention: lower-case phrases separated and ended by " ."."""
    return " . ".join(nouns) + " ."


# --------------------------------------------------------------------------- SAM building and weights


def build_custom_sam(config: dict) -> torch.nn.Module:
    """A randomly initialised ``segment_anything`` SAM of any size; keys of ``config`` override ``SAM_CONFIG_DEFAULTS``.

    ``prompt_embed_dim`` is accepted as another name for ``out_chans``.
    """
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    cfg = _full_sam_config(config)
    image_embedding_size = cfg["img_size"] // cfg["patch_size"]
    dim = cfg["out_chans"]
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=cfg["img_size"],
            patch_size=cfg["patch_size"],
            embed_dim=cfg["embed_dim"],
            depth=cfg["depth"],
            num_heads=cfg["num_heads"],
            mlp_ratio=cfg["mlp_ratio"],
            out_chans=dim,
            qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=cfg["use_rel_pos"],
            window_size=cfg["window_size"],
            global_attn_indexes=tuple(cfg["global_attn_indexes"]),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(image_embedding_size, image_embedding_size),
            input_image_size=(cfg["img_size"], cfg["img_size"]),
            mask_in_chans=cfg["mask_in_chans"],
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=cfg["num_multimask_outputs"],
            transformer=TwoWayTransformer(
                depth=cfg["decoder_depth"],
                embedding_dim=dim,
                mlp_dim=cfg["decoder_mlp_dim"],
                num_heads=cfg["decoder_num_heads"],
            ),
            transformer_dim=dim,
            iou_head_depth=cfg["iou_head_depth"],
            iou_head_hidden_dim=cfg["iou_head_hidden_dim"],
        ),
        pixel_mean=cfg["pixel_mean"],
        pixel_std=cfg["pixel_std"],
    )
    return sam.eval()


def _full_sam_config(config: dict) -> dict:
    config = dict(config)
    if "prompt_embed_dim" in config:
        ped = config.pop("prompt_embed_dim")
        if config.setdefault("out_chans", ped) != ped:
            raise ComatError(
                f"SAM config has out_chans={config['out_chans']} but prompt_embed_dim={ped}; they are the same "
                "dimension in SAM, give one of them"
            )
    unknown = sorted(set(config) - set(SAM_CONFIG_DEFAULTS))
    if unknown:
        raise ComatError(f"SAM config has unknown keys {unknown}; allowed keys are {sorted(SAM_CONFIG_DEFAULTS)}")
    cfg = {**SAM_CONFIG_DEFAULTS, **config}
    if cfg["img_size"] % cfg["patch_size"]:
        raise ComatError(f"SAM config img_size {cfg['img_size']} is not a multiple of patch_size {cfg['patch_size']}")
    return cfg


def save_sam(sam_model: torch.nn.Module, directory: str | os.PathLike, config: dict) -> Path:
    """Write ``sam_model`` as ``directory/sam_config.json`` + ``model.safetensors`` (load with ``sam_type="custom"``).

    ``config`` is what built the model (see :func:`build_custom_sam`); it is stored completed with the
    defaults so the directory does not depend on them changing later.
    """
    from safetensors.torch import save_file

    cfg = _full_sam_config(config)
    built = (sam_model.image_encoder.img_size, sam_model.prompt_encoder.embed_dim)
    if built != (cfg["img_size"], cfg["out_chans"]):
        raise ComatError(
            f"save_sam: the model has img_size/out_chans {built} but the config says "
            f"{(cfg['img_size'], cfg['out_chans'])}; pass the config the model was built from"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in sam_model.state_dict().items()}
    save_file(state, str(directory / SAM_WEIGHTS_NAME), metadata={"format": "pt"})
    (directory / SAM_CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")
    return directory


def load_sam_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a SAM checkpoint: ``.safetensors``, or ``.pth``/``.pt`` read with ``weights_only=True``.

    A pickle that holds anything but tensors is refused, never unpickled freely.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ComatError(
            f"SAM checkpoint '{path}' holds more than tensors and is refused (weights_only=True): "
            f"{str(e).splitlines()[0]}; convert it to .safetensors from a trusted source"
        ) from None
    # Some training scripts wrap the weights; the official SAM files are the bare state dict.
    if isinstance(state, dict) and not all(isinstance(v, torch.Tensor) for v in state.values()):
        state = next((state[k] for k in ("model", "state_dict") if isinstance(state.get(k), dict)), state)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ComatError(
            f"SAM checkpoint '{path}' is not a state dict of tensors; pass a SAM .pth or .safetensors file"
        )
    return state


def _find_sam_weights(ref: str | os.PathLike) -> Path:
    path = Path(ref).expanduser()
    if path.is_file():
        return path
    if not path.exists():
        if path.suffix in _WEIGHT_SUFFIXES:
            raise ComatError(
                f"SAM checkpoint '{ref}' does not exist; download it (e.g. sam_vit_b_01ec64.pth from the "
                "segment-anything release) or pass a directory that holds one"
            )
        try:
            path = resolve_model_path(ref)
        except ComatError as e:
            raise ComatError(f"SAM weights: {e}") from None
    candidates = sorted(path.glob("*.safetensors")) or sorted(p for s in _PICKLE_SUFFIXES for p in path.glob("*" + s))
    if (path / SAM_WEIGHTS_NAME).is_file():
        return path / SAM_WEIGHTS_NAME
    if len(candidates) != 1:
        found = "none" if not candidates else ", ".join(p.name for p in candidates)
        raise ComatError(
            f"SAM directory '{path}' must hold exactly one checkpoint (.safetensors preferred, or .pth), "
            f"found {found}; pass the checkpoint file itself"
        )
    return candidates[0]


def load_sam(sam: str | os.PathLike, sam_type: str = "vit_b") -> torch.nn.Module:
    """Build SAM of ``sam_type`` (``vit_b``/``vit_l``/``vit_h``, or ``custom``) and load the weights at ``sam``."""
    from segment_anything import sam_model_registry

    if sam_type != "custom" and sam_type not in sam_model_registry:
        raise ComatError(f"unknown sam_type '{sam_type}'; use one of {sorted(sam_model_registry)} or 'custom'")
    weights = _find_sam_weights(sam)
    if sam_type == "custom":
        config_path = weights.parent / SAM_CONFIG_NAME
        if not config_path.is_file():
            raise ComatError(
                f"custom SAM needs '{config_path}' next to its weights; "
                "write the model with comat.models.segmenter.save_sam"
            )
        model = build_custom_sam(json.loads(config_path.read_text()))
    else:
        model = sam_model_registry[sam_type](checkpoint=None)
    try:
        model.load_state_dict(load_sam_state_dict(weights))
    except RuntimeError as e:
        raise ComatError(
            f"SAM checkpoint '{weights}' does not fit sam_type '{sam_type}' "
            f"({str(e).splitlines()[0]} ...); pass the matching sam_type"
        ) from None
    return model.eval()


# --------------------------------------------------------------------------- the segmenter


def to_uint8_hwc(image: torch.Tensor | PIL.Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, PIL.Image.Image):
        return np.asarray(image.convert("RGB")).copy()
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"a numpy image must be HxWx3 uint8, got {image.shape} {image.dtype}")
        return image
    if isinstance(image, torch.Tensor):
        x = image.detach()
        if x.ndim == 4 and x.shape[0] == 1:
            x = x[0]
        if x.ndim != 3 or x.shape[0] != 3:
            raise ValueError(f"a tensor image must be [3, H, W] or [1, 3, H, W], got {tuple(image.shape)}")
        if x.dtype != torch.uint8:
            # Float images are the VAE's decoded [0, 1] range.
            x = (x.float().clamp(0, 1) * 255).round().to(torch.uint8)
        return x.permute(1, 2, 0).cpu().numpy()
    raise TypeError(f"image must be a torch.Tensor, PIL image or numpy array, got {type(image).__name__}")


class Segmenter:
    """Open-vocabulary noun segmenter: GroundingDINO boxes + SAM masks (paper: Grounded-SAM)."""

    def __init__(
        self,
        detector: torch.nn.Module,
        processor,
        sam: torch.nn.Module,
        *,
        box_threshold: float = 0.3,
        text_threshold: float = 0.25,
        device: str | torch.device = "cpu",
    ):
        from segment_anything import SamPredictor

        self.device = torch.device(device)
        self.detector = detector.to(self.device).eval()
        self.processor = processor
        self.sam = sam.to(self.device).eval()
        self.predictor = SamPredictor(self.sam)
        self.box_threshold = box_threshold
        self.text_threshold = text_threshold

    @torch.no_grad()
    def detect(self, image: np.ndarray, nouns: Sequence[str]) -> list[torch.Tensor | None]:
        """Per noun, its best GroundingDINO box (x0, y0, x1, y1 in pixels of ``image``, HxWx3 uint8) or None."""
        inputs = self.processor(
            images=PIL.Image.fromarray(image), text=detection_query(nouns), return_tensors="pt"
        ).to(self.device)
        outputs = self.detector(**inputs)
        post = self.processor.post_process_grounded_object_detection
        # transformers < 4.51 calls the box threshold `box_threshold` and the labels `labels`.
        box_kw = "threshold" if "threshold" in inspect.signature(post).parameters else "box_threshold"
        result = post(
            outputs,
            inputs["input_ids"],
            text_threshold=self.text_threshold,
            target_sizes=[image.shape[:2]],
            **{box_kw: self.box_threshold},
        )[0]
        labels = result["text_labels"] if "text_labels" in result else result["labels"]
        # With no box left, batch_decode([]) still yields one empty label; trim labels to the boxes.
        labels = labels[: len(result["boxes"])]
        return best_box_per_noun(nouns, result["boxes"], result["scores"], labels)

    # no_grad rather than inference_mode: the masks multiply attention maps that need gradients.
    @torch.no_grad()
    def __call__(self, image: torch.Tensor | PIL.Image.Image, nouns: list[str]) -> torch.Tensor:
        """Masks ``bool [len(nouns), H, W]`` at the image's size; all-zero for a noun not found.

        ``image``: ``[3, H, W]`` / ``[1, 3, H, W]`` tensor (float in [0, 1] or uint8), a PIL image or an
        HxWx3 uint8 array. The result lives on the tensor's device (CPU otherwise). Repeated nouns share
        one query phrase and get the same mask.
        """
        out_device = image.device if isinstance(image, torch.Tensor) else torch.device("cpu")
        pixels = to_uint8_hwc(image)
        h, w = pixels.shape[:2]
        masks = torch.zeros(len(nouns), h, w, dtype=torch.bool)
        keys = [" ".join(_words(n)) for n in nouns]
        if any(not k for k in keys):
            raise ValueError(f"every noun needs at least one letter or digit, got {list(nouns)}")
        unique = list(dict.fromkeys(keys))
        if not unique:
            return masks.to(out_device)
        boxes = self.detect(pixels, unique)
        found = [i for i, b in enumerate(boxes) if b is not None]
        if found:
            box_t = torch.stack([boxes[i] for i in found]).float()
            box_t[:, 0::2] = box_t[:, 0::2].clamp(0, w)
            box_t[:, 1::2] = box_t[:, 1::2].clamp(0, h)
            self.predictor.set_image(pixels, image_format="RGB")
            sam_boxes = self.predictor.transform.apply_boxes_torch(box_t, (h, w)).to(self.device)
            pred, _, _ = self.predictor.predict_torch(None, None, boxes=sam_boxes, multimask_output=False)
            self.predictor.reset_image()
            by_noun = {unique[i]: m[0].cpu() for i, m in zip(found, pred)}
            for j, key in enumerate(keys):
                if key in by_noun:
                    masks[j] = by_noun[key]
        return masks.to(out_device)


def load_segmenter(
    detector: str | os.PathLike,
    sam: str | os.PathLike,
    *,
    sam_type: str = "vit_b",
    box_threshold: float = 0.3,
    text_threshold: float = 0.25,
    device: str | torch.device = "cpu",
) -> Segmenter:
    """Load GroundingDINO from ``detector`` (hub id or directory with safetensors) and SAM from ``sam``.

    ``sam`` is a checkpoint file or a directory holding one; with ``sam_type="custom"`` a directory
    written by :func:`save_sam`. Defaults are the official CoMat thresholds (box 0.3, text 0.25).
    """
    from transformers import AutoProcessor, GroundingDinoForObjectDetection

    try:
        det_dir = resolve_model_path(detector)
    except ComatError as e:
        raise ComatError(f"GroundingDINO detector: {e}") from None
    if not (det_dir / "config.json").is_file():
        raise ComatError(
            f"GroundingDINO directory '{det_dir}' has no config.json; pass a directory written by save_pretrained "
            "or a hub id such as IDEA-Research/grounding-dino-tiny"
        )
    try:
        model = GroundingDinoForObjectDetection.from_pretrained(det_dir, use_safetensors=True, dtype=torch.float32)
    except OSError as e:
        raise ComatError(
            f"GroundingDINO in '{det_dir}' could not be loaded from safetensors ({str(e).splitlines()[0]}); "
            "re-save it with save_pretrained(safe_serialization=True)"
        ) from None
    processor = AutoProcessor.from_pretrained(det_dir)
    return Segmenter(
        model,
        processor,
        load_sam(sam, sam_type),
        box_threshold=box_threshold,
        text_threshold=text_threshold,
        device=device,
    )
