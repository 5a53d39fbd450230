"""Plain image generation from a (possibly LoRA-tuned) pipeline, with the resolved config saved beside it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from comat.core.config import write_resolved
from comat.core.errors import ComatError
from comat.core.runtime import environment, resolve_device
from comat.models.t2i import check_prompt_lengths, load_t2i, lora_fingerprint


@dataclasses.dataclass
class GenerateConfig:
    model: str = "toy"
    ckpt: str | None = None
    prompts: list[str] = dataclasses.field(default_factory=list)
    seed: int = 0
    images_per_prompt: int = 1
    steps: int = 25
    guidance: float = 7.5
    size: int | None = None  # None: the model's native resolution
    device: str = "auto"


def read_prompt_file(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise ComatError(f"prompt file '{path}' does not exist; pass a text file with one prompt per line")
    try:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise ComatError(f"prompt file '{path}' is not UTF-8 text; save it as UTF-8 with one prompt per line") from None
    if not prompts:
        raise ComatError(f"prompt file '{path}' holds no prompts; write one prompt per line")
    return prompts


def generate(cfg: GenerateConfig, out: Path) -> list[Path]:
    """Generate ``images_per_prompt`` images per prompt; image j of prompt i uses seed ``cfg.seed + j``."""
    if not cfg.prompts:
        raise ComatError("no prompts given; pass --prompt TEXT or --prompts FILE")
    device = resolve_device(cfg.device)
    pipe = load_t2i(cfg.model, lora=cfg.ckpt, device=device)
    truncated = check_prompt_lengths(pipe, cfg.prompts)
    size = cfg.size or pipe.unet.config.sample_size * pipe.vae_scale_factor
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, prompt in enumerate(cfg.prompts):
        for j in range(cfg.images_per_prompt):
            generator = torch.Generator(device="cpu").manual_seed(cfg.seed + j)
            image = pipe(
                prompt, num_inference_steps=cfg.steps, guidance_scale=cfg.guidance, height=size, width=size,
                generator=generator,
            ).images[0]
            path = out / f"{i:04d}_{cfg.seed + j}.png"
            image.save(path)
            paths.append(path)
    write_resolved(
        cfg, out,
        {
            "lora_sha256": lora_fingerprint(cfg.ckpt) if cfg.ckpt else None,
            "truncated_prompts": truncated,
            "resolution": size,
            "environment": environment(),
        },
    )
    return paths
