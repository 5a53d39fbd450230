"""The CoMat training configuration and its presets (paper Table 8 for ``sd15`` / ``sdxl``; ``toy`` for a CPU)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

from comat.core.config import load_config
from comat.core.errors import ComatError
from comat.models.t2i import ATTENTION_PROJECTIONS

PRESET_DIR = Path(__file__).resolve().parent / "presets"
CAPTIONER_KINDS = ("blip", "git", "llava", "none")
# The checkpoint each captioner kind uses unless captioner.model names one (paper: BLIP large; Table 5's GIT/LLaVA).
DEFAULT_CAPTIONERS = {"blip": "Salesforce/blip-image-captioning-large", "git": "microsoft/git-large-coco",
                      "llava": "llava-hf/llava-1.5-7b-hf"}
DISCRIMINATOR_KINDS = ("none", "unet-generated", "unet-real", "dino-image")


@dataclasses.dataclass
class LoraConfig:
    rank: int = 128
    alpha: int = 128
    target_modules: tuple[str, ...] = ATTENTION_PROJECTIONS


@dataclasses.dataclass
class CaptionerConfig:
    """Concept activation: ``L_i2t = -log p_C(prompt | image)`` from a frozen captioner."""

    kind: str = "blip"  # blip | git | llava | none
    model: str | None = None  # None: DEFAULT_CAPTIONERS[kind], or toy/<kind> when the base model is a toy one
    prefix: str = "a photography of "
    reduction: Literal["sum", "mean"] = "sum"  # sum: the paper's eq. 2; mean with label_smoothing=0.1: official code
    label_smoothing: float = 0.0
    jitter: int = 2
    weight: float = 1.0


@dataclasses.dataclass
class DiscriminatorConfig:
    """Fidelity preservation: a latent discriminator initialised from the pretrained (SD1.5) UNet."""

    kind: str = "unet-generated"  # none | unet-generated | unet-real | dino-image
    model: str | None = None  # UNet to initialise D from; None: the base model's UNet
    feature_model: str | None = None  # dino-image: the DINOv2 feature network
    weight: float = 1.0  # lambda: 1 for SD1.5, 0.5 for SDXL
    lora_rank: int = 128
    lr: float = 5e-5
    betas: tuple[float, float] = (0.0, 0.999)
    grad_clip: float = 1.0


@dataclasses.dataclass
class MixedLatentConfig:
    """Denoise noisy ground-truth latents of an image-caption set and score them with the captioner too."""

    enabled: bool = False
    data: str = "coco"  # coco (a directory of images + captions.jsonl) | toy
    batch: int = 2
    tau_min: int = 400
    tau_max: int = 700


@dataclasses.dataclass
class AttributeConcentrationConfig:
    enabled: bool = True
    detector: str = "IDEA-Research/grounding-dino-tiny"
    sam: str = "sam_vit_b_01ec64.safetensors"
    sam_type: str = "vit_b"
    spacy_model: str = "en_core_web_sm"
    blocks: tuple[str, ...] = ("mid", "up")
    steps: int = 2  # r: how many of the K grad steps capture attention
    alpha: float = 1e-3
    beta: float = 5e-5
    variant: Literal["paper", "official"] = "paper"


@dataclasses.dataclass
class TrainConfig:
    model: str = "toy"
    prompts: str | None = None  # text file, one prompt per line; None: the preset's prompt set
    steps: int = 2000
    batch: int = 4
    grad_accum: int = 1
    lr: float = 5e-5
    grad_clip: float = 0.1
    mixed_precision: Literal["no", "fp16", "bf16"] = "fp16"
    resolution: int = 512
    sampler: Literal["ddpm", "ddim"] = "ddpm"
    sample_steps: int = 50
    guidance: float = 7.5
    grad_steps: int = 5  # K
    grad_skip: int = 0  # the first grad_skip sampling steps never carry a gradient; K are spaced over the rest
    stop_grad: bool = True
    vae_checkpointing: bool = False
    seed: int = 0
    ema_decay: float = 0.0  # EMA of the generator's trainable tensors, saved as the final LoRA; 0: off
    ckpt_every: int = 200
    sample_every: int = 200
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    captioner: CaptionerConfig = dataclasses.field(default_factory=CaptionerConfig)
    discriminator: DiscriminatorConfig = dataclasses.field(default_factory=DiscriminatorConfig)
    mixed_latent: MixedLatentConfig = dataclasses.field(default_factory=MixedLatentConfig)
    attribute_concentration: AttributeConcentrationConfig = dataclasses.field(
        default_factory=AttributeConcentrationConfig
    )

    def _on_toy(self) -> bool:
        return self.model == "toy" or self.model.startswith("toy/")

    def captioner_model(self) -> str:
        if self.captioner.model:
            return self.captioner.model
        return f"toy/{self.captioner.kind}" if self._on_toy() else DEFAULT_CAPTIONERS[self.captioner.kind]

    def dino_model(self) -> str | None:
        """``dino-image``'s feature network; on a toy model ``tiny`` (a random small DINOv2), since no DINOv2
        weights exist at toy scale."""
        return self.discriminator.feature_model or ("tiny" if self._on_toy() else None)

    def validate(self) -> "TrainConfig":
        for field in ("steps", "batch", "grad_accum", "sample_steps", "ckpt_every", "sample_every"):
            if getattr(self, field) < 1:
                raise ComatError(f"{field}={getattr(self, field)} must be a positive integer; set it with --set {field}=N")
        if self.captioner.kind not in CAPTIONER_KINDS:
            raise ComatError(f"captioner.kind '{self.captioner.kind}' does not exist; choose one of {', '.join(CAPTIONER_KINDS)}")
        if self.discriminator.kind not in DISCRIMINATOR_KINDS:
            raise ComatError(
                f"discriminator.kind '{self.discriminator.kind}' does not exist; choose one of {', '.join(DISCRIMINATOR_KINDS)}"
            )
        if not 0 <= self.ema_decay < 1:
            raise ComatError(f"ema_decay={self.ema_decay} must be in [0, 1) (0 switches the EMA off)")
        if not 0 <= self.grad_skip < self.sample_steps:
            raise ComatError(f"grad_skip={self.grad_skip} must be in [0, sample_steps={self.sample_steps})")
        if not 0 < self.grad_steps <= self.sample_steps - self.grad_skip:
            raise ComatError(
                f"grad_steps={self.grad_steps} must be between 1 and sample_steps - grad_skip ="
                f" {self.sample_steps - self.grad_skip}"
            )
        if self.attribute_concentration.steps > self.grad_steps:
            raise ComatError(
                f"attribute_concentration.steps={self.attribute_concentration.steps} exceeds grad_steps={self.grad_steps}"
            )
        return self


def presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_train_config(preset: str | None, config: str | Path | None = None, overrides: tuple[str, ...] = ()) -> TrainConfig:
    """Preset < config file < overrides."""
    base = TrainConfig()
    if preset is not None:
        path = PRESET_DIR / f"{preset}.yaml"
        if not path.is_file():
            raise ComatError(f"preset '{preset}' does not exist; choose one of {', '.join(presets())}")
        base = load_config(TrainConfig, path)
    return load_config(TrainConfig, config, overrides, base=base).validate()
