"""Recipes of the toy zoo: architectures (standard configs, small sizes) and their training losses.

Sizes were chosen for a 2-core CPU and a 30 MB zoo (weights stored in float16): the CLIP token table
(49,408 x 64) is the largest single tensor, because the text encoder keeps the real CLIP vocabulary.
"""

from __future__ import annotations

import dataclasses
import filecmp
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTextModel, CLIPTokenizer

from comat.models.tokenizer import clip_tokenizer
from comat.toy.pretrain import export_fp16
from comat.toy.prompts import CATEGORIES, COLORS, SHAPES, SIZES, TEXTURES, PromptSpec
from comat.toy.world import SIZE, RenderedScene, sample_batch

TEXT_MAX_LENGTH = 32  # toy prompts stay under 25 CLIP tokens; shorter sequences make every step cheaper
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_ATTRIBUTE_VALUES = {"color": COLORS, "texture": TEXTURES, "size": SIZES, "shape": SHAPES}


def corrupt(spec: PromptSpec, rng: np.random.Generator) -> PromptSpec:
    """A hard negative: swap one attribute between two mentions, or change one when nothing can be swapped."""
    mentions = list(spec.mentions)
    kinds = list(_ATTRIBUTE_VALUES)
    rng.shuffle(kinds)
    if len(mentions) >= 2:
        i, j = rng.choice(len(mentions), size=2, replace=False)
        for kind in kinds:
            a, b = getattr(mentions[i], kind), getattr(mentions[j], kind)
            if a and b and a != b:
                mentions[i], mentions[j] = (dataclasses.replace(mentions[i], **{kind: b}),
                                            dataclasses.replace(mentions[j], **{kind: a}))
                return dataclasses.replace(spec, mentions=tuple(mentions))
    i = int(rng.integers(len(mentions)))
    for kind in kinds:
        current = getattr(mentions[i], kind)
        if current:
            other = [v for v in _ATTRIBUTE_VALUES[kind] if v != current]
            mentions[i] = dataclasses.replace(mentions[i], **{kind: other[rng.integers(len(other))]})
            return dataclasses.replace(spec, mentions=tuple(mentions))
    return spec


def toy_tokenizer() -> CLIPTokenizer:
    return clip_tokenizer(model_max_length=TEXT_MAX_LENGTH)


def _tokenize(tokenizer: CLIPTokenizer, texts: list[str]) -> torch.Tensor:
    return tokenizer(texts, padding="max_length", truncation=True, max_length=TEXT_MAX_LENGTH, return_tensors="pt").input_ids


def clip_normalize(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (images - mean) / std


class ClipRecipe:
    """A small CLIP trained contrastively, with attribute-swapped captions as hard negatives; its text
    tower becomes the text-to-image model's (frozen) text encoder, the whole model the CLIPScore judge."""

    name, requires, steps, lr, ema, batch = "clip", (), 4000, 5e-4, 0.0, 64

    def __init__(self) -> None:
        self.tokenizer = toy_tokenizer()

    def build(self, zoo: Path) -> dict[str, torch.nn.Module]:
        config = CLIPConfig(
            text_config=dict(vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                             num_attention_heads=4, max_position_embeddings=TEXT_MAX_LENGTH,
                             bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
            vision_config=dict(image_size=SIZE, patch_size=8, hidden_size=64, intermediate_size=256,
                               num_hidden_layers=3, num_attention_heads=4),
            projection_dim=64,
        )
        return {"clip": CLIPModel(config)}

    def loss(self, modules, rng):
        images, prompts, rendered = sample_batch(self.batch, rng)
        negatives = [corrupt(r.scene.spec, rng).text for r in rendered]
        model = modules["clip"]
        out = model(input_ids=_tokenize(self.tokenizer, prompts + negatives), pixel_values=clip_normalize(images))
        logits = out.logits_per_image  # [B, 2B]: the true captions, then one hard negative per image
        target = torch.arange(self.batch)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits[:, : self.batch].T, target)) / 2
        own = logits.diagonal()
        negative = logits[target, target + self.batch]
        return loss, {"swap_acc": (own > negative).float().mean().item()}

    def export(self, modules, zoo: Path) -> None:
        out = zoo / self.name
        export_fp16(modules["clip"], out)
        self.tokenizer.save_pretrained(out)
        CLIPImageProcessor(
            size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}, image_mean=list(CLIP_MEAN),
            image_std=list(CLIP_STD), resample=3,
        ).save_pretrained(out)


class VaeRecipe:
    """AutoencoderKL with 4x downsampling (64x64x3 -> 16x16x4); no mid-block attention keeps it cheap.

    Three stages: the whole autoencoder for ``encoder_steps``; then the decoder alone with extra weight on object
    pixels, which sharpened stripes and dots without moving the latent space; then, from ``restart_steps[0]``, the
    whole autoencoder again with that object weight. After the second stage the VQA judge still accepted only
    79% of reconstructed single objects (texture 71%: the encoder dropped e.g. dark stripes on green); 500 steps
    of the third raised that to 99% (texture 98%) while moving the latents by 12% of their spread, which the
    text-to-image UNet's own last stage adapts to."""

    name, requires, steps, lr, ema, batch = "vae", (), 5500, 1e-3, 0.0, 16
    encoder_steps, restart_steps, restart_lr = 3000, (5000,), 3e-4
    kl_weight = 1e-6
    object_weight = False  # set by at_step

    def build(self, zoo: Path) -> dict[str, torch.nn.Module]:
        vae = AutoencoderKL(
            block_out_channels=(16, 32, 64), down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
            sample_size=SIZE, mid_block_add_attention=False,
        )
        return {"vae": vae}

    def load_export(self, modules, zoo: Path) -> None:
        modules["vae"].load_state_dict(AutoencoderKL.from_pretrained(zoo / self.name, dtype=torch.float32).state_dict())

    def at_step(self, step: int, modules, opt) -> None:
        vae = modules["vae"]
        self.object_weight = step >= self.encoder_steps
        encoder_trains = not self.encoder_steps <= step < self.restart_steps[0]
        vae.encoder.requires_grad_(encoder_trains)
        vae.quant_conv.requires_grad_(encoder_trains)
        if opt is not None:
            for group in opt.param_groups:
                group["lr"] = self.restart_lr if step >= self.restart_steps[0] else self.lr

    def loss(self, modules, rng):
        images, _, rendered = sample_batch(self.batch, rng)
        x = images * 2 - 1
        vae = modules["vae"]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        mse = F.mse_loss(recon, x)
        # Stripes and dots cover little of the image; matching image gradients keeps their edges sharp.
        edges = sum(F.l1_loss(recon.diff(dim=d), x.diff(dim=d)) for d in (2, 3))
        loss = mse + F.l1_loss(recon, x) + edges + self.kl_weight * posterior.kl().mean()
        if self.object_weight:
            objects = object_masks(rendered)
            loss = loss + ((recon - x).abs() * objects).sum() / (objects.sum() * 3).clamp(min=1)
        return loss, {"mse": mse.item(), "edges": edges.item()}

    def export(self, modules, zoo: Path) -> None:
        vae = modules["vae"]
        with torch.no_grad():  # SD scales latents to unit variance; measure it on fresh scenes
            images, _, _ = sample_batch(256, np.random.default_rng(12345))
            std = vae.encode(images * 2 - 1).latent_dist.mean.std().item()
        vae.register_to_config(scaling_factor=1.0 / std)
        export_fp16(vae, zoo / self.name)


def object_masks(rendered: list[RenderedScene]) -> torch.Tensor:
    """Float [n, 1, SIZE, SIZE]: 1 where any object of the scene is visible."""
    return torch.from_numpy(np.stack([np.any(r.masks, axis=0) for r in rendered]))[:, None].float()


def toy_scheduler() -> DDPMScheduler:
    """The toy UNet's noise schedule: the zero-terminal-SNR variant (Lin et al. 2024, "Common Diffusion Noise
    Schedules and Sample Steps are Flawed") of the cosine schedule: betas rescaled so the last step is pure noise, the
    model predicts v (epsilon is undefined there), and samplers start at t=999 (trailing spacing), as SD 2.x-style
    checkpoints trained with it are configured."""
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False, steps_offset=1,
                         prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing")


def min_snr_weights(scheduler: DDPMScheduler, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023, as in diffusers' train_text_to_image ``--snr_gamma``): the
    easy low-noise steps count less, leaving more of each update to the high-noise steps where an object's size,
    colour and place are decided. Epsilon prediction: min(SNR, gamma) / SNR. V prediction: (min(SNR, gamma) + 1) /
    (SNR + 1), the truncated SNR+1 weighting of the v-loss; diffusers' min(SNR, gamma) / (SNR + 1) would give the
    zero-SNR step, which decides whether an object is drawn at all, no weight."""
    alpha_bar = scheduler.alphas_cumprod[t]
    snr = alpha_bar / (1 - alpha_bar)
    if scheduler.config.prediction_type == "v_prediction":
        return (snr.clamp(max=gamma) + 1) / (snr + 1)
    return snr.clamp(max=gamma) / snr


class UnetRecipe:
    """The denoiser, trained on latents of the frozen VAE with the frozen CLIP text tower, 10% prompt
    dropout for classifier-free guidance and an EMA copy; exported as the full ``t2i`` pipeline.

    V-prediction on the zero-terminal-SNR schedule (:func:`toy_scheduler`) with min-SNR-5 weighting
    (:func:`min_snr_weights`) from the first step. An epsilon model's samplers start at t=960, where the cosine
    schedule still leaves 6% of the signal that pure noise lacks: a third of the samples of small single objects came
    out as blank canvas at every sampler and guidance scale tried; min-SNR weighting moves each update towards the
    high-noise steps where an object's size, colour and place are decided.

    Constant learning rate and a short EMA for ``constant_steps``, then a linear decay to 5% with a longer EMA, which
    settles attribute details the constant phase leaves moving. A batch draws each scene's prompt category from
    ``first_categories``: all eight, single objects four more times and the shape category (sizes) twice more, because
    with a uniform draw only ~17% of prompts name a size and objects asked to be big came out big half the time.
    A second, short stage (from the first one's EMA, as an export would ship it) at a low constant learning rate
    adds texture binding twice more to that mix: the size-heavy first stage leaves textures the attribute the
    model draws worst. A third stage (from the second's export, with its settings) weighs the v-loss of cells an object
    touches ``1 + third_object_weight`` times the background's: objects cover a fifth of the image or less, so an
    unweighted loss is mostly background, and the dots and the size asked for were what the samples missed.
    The measurements behind these choices: docs/toy-zoo-*.md."""

    name, requires, steps, lr, ema, batch = "t2i", ("clip", "vae"), 28000, 5e-4, 0.995, 32
    constant_steps, decay_steps, final_lr_fraction, decay_ema = 8000, 16000, 0.05, 0.999
    snr_gamma, prompt_dropout = 5.0, 0.1
    first_categories = CATEGORIES + ("single",) * 4 + ("shape",) * 2
    second_categories = CATEGORIES + ("single",) * 4 + ("texture",) * 2 + ("shape",) * 2  # order fixes the data stream
    restart_steps = (0, 18000, 20000)  # the first stage's data stream is seeded [seed, 0] like any stage's
    second_lr, third_object_weight = 1e-4, 3.0
    object_weight = 0.0  # set by at_step

    def at_step(self, step: int, modules, opt) -> None:
        second = step >= self.restart_steps[1]
        progress = min(1.0, max(0.0, (step - self.constant_steps) / (self.decay_steps - self.constant_steps)))
        for group in opt.param_groups:
            group["lr"] = self.second_lr if second else self.lr * (1 - (1 - self.final_lr_fraction) * progress)
        self.ema = type(self).ema if step < self.constant_steps else self.decay_ema
        self.categories = self.second_categories if second else self.first_categories
        self.object_weight = self.third_object_weight if step >= self.restart_steps[2] else 0.0

    def __init__(self) -> None:
        self.tokenizer = toy_tokenizer()
        self.scheduler = toy_scheduler()
        self.categories = self.first_categories

    def build(self, zoo: Path) -> dict[str, torch.nn.Module]:
        self.vae = AutoencoderKL.from_pretrained(zoo / "vae", dtype=torch.float32).requires_grad_(False).eval()
        self.text_encoder = CLIPTextModel.from_pretrained(zoo / "clip", dtype=torch.float32).requires_grad_(False).eval()
        unet = UNet2DConditionModel(
            sample_size=SIZE // 4, block_out_channels=(32, 64, 128), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=self.text_encoder.config.hidden_size, attention_head_dim=8, norm_num_groups=16,
        )
        return {"unet": unet}

    def load_export(self, modules, zoo: Path) -> None:
        exported = UNet2DConditionModel.from_pretrained(zoo / self.name / "unet", dtype=torch.float32)
        modules["unet"].load_state_dict(exported.state_dict())

    def loss(self, modules, rng):
        images, prompts, rendered = sample_batch(self.batch, rng, self.categories)
        prompts = ["" if rng.random() < self.prompt_dropout else p for p in prompts]
        with torch.no_grad():
            latents = self.vae.encode(images * 2 - 1).latent_dist.sample() * self.vae.config.scaling_factor
            context = self.text_encoder(_tokenize(self.tokenizer, prompts)).last_hidden_state
        noise = torch.randn_like(latents)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (self.batch,))
        pred = modules["unet"](self.scheduler.add_noise(latents, noise, t), t, context).sample
        velocity = self.scheduler.get_velocity(latents, noise, t)
        if self.object_weight:
            objects = object_masks(rendered)
            weights = 1 + self.object_weight * F.max_pool2d(objects, SIZE // latents.shape[-1])[:, 0]
            error = (pred - velocity).pow(2).mean(dim=1)
            per_sample = (weights * error).sum(dim=(1, 2)) / weights.sum(dim=(1, 2))
        else:  # the unweighted stages keep their own reduction, so they reproduce the shipped exports bit for bit
            per_sample = F.mse_loss(pred, velocity, reduction="none").mean(dim=(1, 2, 3))
        return (per_sample * min_snr_weights(self.scheduler, t, self.snr_gamma)).mean(), {}

    def export(self, modules, zoo: Path) -> None:
        pipe = StableDiffusionPipeline(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=modules["unet"],
            scheduler=self.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipe.to(torch.float16).save_pretrained(zoo / self.name, safe_serialization=True)
        share_zoo_files(zoo / self.name, zoo)


def share_zoo_files(pipeline_dir: Path, zoo: Path) -> None:
    """Replace the pipeline's copies of other zoo models by relative symlinks, keeping the zoo within its size budget.

    The VAE and the tokenizer are byte-identical to ``vae`` and ``clip``'s; the text encoder is ``clip``'s text
    tower, and ``CLIPTextModel`` loads its ``text_model.*`` tensors straight from the CLIPModel file (the vision
    tensors are ignored), so ``from_pretrained`` sees an ordinary pipeline directory."""
    from safetensors import safe_open

    def link(path: Path, target: Path) -> None:
        path.unlink()
        path.symlink_to(os.path.relpath(target, path.parent))

    for path in sorted(p for p in pipeline_dir.rglob("*") if p.is_file() and not p.is_symlink()):
        twin = next((q for q in sorted(zoo.glob("*/*")) if q.name == path.name and q.is_file() and not q.is_symlink()
                     and not q.is_relative_to(pipeline_dir) and filecmp.cmp(q, path, shallow=False)), None)
        if twin is not None:
            link(path, twin)
    text_weights, clip_weights = pipeline_dir / "text_encoder" / "model.safetensors", zoo / "clip" / "model.safetensors"
    if text_weights.is_file() and not text_weights.is_symlink() and clip_weights.is_file():
        with safe_open(text_weights, "pt") as a, safe_open(clip_weights, "pt") as b:
            same = set(a.keys()) <= set(b.keys()) and all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
        if same:
            link(text_weights, clip_weights)


