"""Text-to-image pipelines (SD1.5 and SDXL families) and their LoRA adapters.

A LoRA written by ``save_lora`` is in diffusers' format, so plain ``pipe.load_lora_weights(dir)`` loads it;
``load_lora`` first checks that it fits the base model, because diffusers silently skips keys that
match nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Literal

import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from peft import LoraConfig
from safetensors import safe_open

from comat.core.errors import ComatError
from comat.models.hub import resolve_model_path

log = logging.getLogger(__name__)

Family = Literal["sd", "sdxl"]
PIPELINES: dict[str, type[DiffusionPipeline]] = {
    "StableDiffusionPipeline": StableDiffusionPipeline,
    "StableDiffusionXLPipeline": StableDiffusionXLPipeline,
}
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
# diffusers writes `<module>.lora.down/up.weight`; peft-style files use `<module>.lora_A/lora_B.weight`.
_LORA_KEY = re.compile(r"(?P<module>.+)\.(?P<part>lora\.down|lora\.up|lora_A|lora_B)(\.[^.]+)?\.weight")
_DOWN = ("lora.down", "lora_A")


@dataclasses.dataclass
class LoraSpec:
    """LoRA on the UNet's attention projections (paper Table 8: rank 128, alpha = rank)."""

    rank: int = 128
    alpha: int = 128
    target_modules: tuple[str, ...] = ATTENTION_PROJECTIONS
    dropout: float = 0.0


def family_of(pipe: DiffusionPipeline) -> Family:
    return "sdxl" if isinstance(pipe, StableDiffusionXLPipeline) else "sd"


def load_t2i(
    ref: str | os.PathLike,
    *,
    lora: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """Load an SD1.5- or SDXL-family pipeline from a hub id, a local directory or ``toy``; optionally apply a LoRA."""
    path = resolve_model_path(ref)
    index = path / "model_index.json"
    if not index.is_file():
        raise ComatError(f"'{ref}' has no model_index.json; pass a diffusers pipeline directory (save_pretrained output)")
    class_name = json.loads(index.read_text()).get("_class_name")
    if class_name not in PIPELINES:
        raise ComatError(f"'{ref}' is a {class_name}; supported pipelines are {', '.join(PIPELINES)}")
    kwargs = {"safety_checker": None, "requires_safety_checker": False} if class_name == "StableDiffusionPipeline" else {}
    from diffusers.utils import logging as diffusers_logging

    bars = diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()  # a bar per component load buries the tool's own output
    try:
        pipe = PIPELINES[class_name].from_pretrained(path, dtype=dtype, use_safetensors=True, **kwargs)
    except (OSError, EnvironmentError) as e:
        raise ComatError(f"could not load pipeline '{ref}': {str(e).splitlines()[0]} (weights must be .safetensors)") from None
    finally:
        if bars:
            diffusers_logging.enable_progress_bar()
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        load_lora(pipe, lora)
    return pipe.to(device)


def add_lora(unet: torch.nn.Module, spec: LoraSpec, adapter_name: str = "default") -> list[torch.nn.Parameter]:
    """Attach a trainable LoRA to ``unet`` (base weights frozen); return the trainable parameters."""
    unet.requires_grad_(False)
    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        init_lora_weights="gaussian",
        target_modules=list(spec.target_modules),
    )
    try:
        unet.add_adapter(config, adapter_name=adapter_name)
    except ValueError as e:
        raise ComatError(f"LoRA target modules {list(spec.target_modules)} do not fit this UNet: {e}") from None
    return [p for p in unet.parameters() if p.requires_grad]


def save_lora(pipe: DiffusionPipeline, directory: str | os.PathLike, adapter_name: str = "default") -> Path:
    """Write the UNet LoRA in diffusers' format (``pytorch_lora_weights.safetensors``)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet, adapter_name=adapter_name))
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    type(pipe).save_lora_weights(directory, unet_lora_layers=layers, safe_serialization=True)
    return directory / LORA_WEIGHT_NAME


def _lora_file(directory: str | os.PathLike) -> Path:
    path = Path(directory)
    if path.is_dir():
        path = path / LORA_WEIGHT_NAME
    if not path.is_file():
        raise ComatError(f"no LoRA at '{directory}': expected {LORA_WEIGHT_NAME} (written by `comat train`)")
    return path


def lora_rank(directory: str | os.PathLike) -> int:
    with safe_open(_lora_file(directory), framework="pt") as f:
        key = next(k for k in f.keys() if (m := _LORA_KEY.fullmatch(k)) and m["part"] in _DOWN)
        return f.get_slice(key).get_shape()[0]


def check_lora_fits(unet: torch.nn.Module, directory: str | os.PathLike, expected_rank: int | None = None) -> None:
    """Raise a one-line error if any LoRA tensor names a module the UNet lacks or has the wrong shape."""
    path = _lora_file(directory)
    with safe_open(path, framework="pt") as f:
        for key in f.keys():
            match = _LORA_KEY.fullmatch(key)
            if match is None:
                continue
            module_path = match["module"].removeprefix("unet.")
            try:
                module = unet.get_submodule(module_path)
            except AttributeError:
                raise ComatError(
                    f"LoRA '{path}' targets '{module_path}', which this UNet lacks; it was trained for another base model"
                ) from None
            module = getattr(module, "base_layer", module)
            shape = f.get_slice(key).get_shape()
            # down (lora_A) is [rank, in_features], up (lora_B) is [out_features, rank]; Conv adds kernel dims.
            side, got, rank = (1, shape[1], shape[0]) if match["part"] in _DOWN else (0, shape[0], shape[1])
            wanted = module.weight.shape[side]
            if got != wanted:
                raise ComatError(
                    f"LoRA '{path}' tensor '{key}' has size {got} where '{module_path}' needs {wanted}; "
                    "it was trained for another base model"
                )
            if expected_rank is not None and rank != expected_rank:
                raise ComatError(f"LoRA '{path}' has rank {rank} but the config asks for rank {expected_rank}; set lora.rank={rank}")


def load_lora(pipe: DiffusionPipeline, directory: str | os.PathLike, adapter_name: str = "default") -> None:
    check_lora_fits(pipe.unet, directory)
    pipe.load_lora_weights(str(Path(directory)), weight_name=LORA_WEIGHT_NAME, adapter_name=adapter_name)


def lora_fingerprint(directory: str | os.PathLike) -> str:
    return hashlib.sha256(_lora_file(directory).read_bytes()).hexdigest()


def check_prompt_lengths(pipe: DiffusionPipeline, prompts: list[str]) -> list[str]:
    """Warn about and return the prompts the text encoder will truncate (77 CLIP tokens for SD)."""
    tok = pipe.tokenizer
    too_long = [p for p in prompts if len(tok(p, truncation=False).input_ids) > tok.model_max_length]
    for p in too_long:
        log.warning("prompt longer than %d tokens is truncated: %r", tok.model_max_length, p[:80])
    return too_long


def num_parameters(module: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
