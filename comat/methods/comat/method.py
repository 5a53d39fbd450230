"""CoMat (arXiv 2404.03653): the generator loss of Algorithm 1 and its discriminator, as a :class:`FineTuneMethod`.

Generator step (paper Sec. 3, Fig. 3): sample from noise with ``K`` grad steps, decode, then
``L = w * L_i2t + L_pos + L_neg + lambda * L_adv (+ w * L_i2t of mixed latents)``. Discriminator step after it:
BCE on ``[fake.detach(), real]``. Each module can be switched off (``captioner.kind=none``,
``discriminator.kind=none``, ``attribute_concentration.enabled=false``, ``mixed_latent.enabled=false``), and a
module that is off is never built: no captioner, no discriminator, no attention-capture processor.

Choices the paper leaves open, made here:

* AC captures at ``r`` of the ``K`` grad steps drawn at random per step; its terms are summed over those steps (as
  the official code does). ``variant=paper`` takes one map per step (heads and layers averaged at the largest
  captured size); ``variant=official`` sums the official terms over resolution groups and also parses prompts the
  official way (``parse_entities(official=True)``).
* ``unet-generated`` real latents are what the original model (LoRA disabled) samples for the same prompt with the
  training sampler, from a seed derived from ``(seed, prompt)``; they are cached on disk under a key of the model
  fingerprint, prompt, seed, precision and sampler settings and reused by every later run (``$COMAT_CACHE``, default
  ``~/.cache/comat``). ``dino-image`` uses the same cached latents, decoded, as its real images.
* Mixed latents start at the sampler step whose timestep is nearest to ``tau ~ U[tau_min, tau_max]`` and get
  ``min(K, steps left)`` grad steps with a random phase.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from comat.core.errors import ComatError
from comat.core.runtime import cache_dir
from comat.core.worlds import WORLDS
from comat.generation.attention import AttentionStore
from comat.generation.sampling import (
    cond_rows,
    decode,
    encode,
    encode_images,
    grad_step_indices,
    initial_latents,
    make_scheduler,
    null_embeds,
    sample_with_grad,
)
from comat.methods.base import Batch, FineTuneMethod, Terms, Update
from comat.methods.comat.config import TrainConfig
from comat.methods.comat.losses import (
    ImageFeatureDiscriminator,
    LatentDiscriminator,
    attribute_concentration_loss,
    concept_activation_loss,
    discriminator_loss,
    generator_adversarial_loss,
)
from comat.models.dino import tiny_dinov2
from comat.models.fingerprint import model_fingerprint
from comat.models.hub import resolve_model_path
from comat.models.t2i import LoraSpec, add_lora, family_of, load_lora, load_t2i, save_lora

WORLD_PAIRS = 256  # size of a world's image-caption pool (mixed_latent.data=toy)


def fp32_(params: list[nn.Parameter]) -> list[nn.Parameter]:
    # AdamW on half-precision weights loses small updates; trainable tensors stay float32 under AMP.
    for p in params:
        p.data = p.data.float()
    return params


class ImageCaptions:
    """Image-caption pairs (mixed latents, ``unet-real``): a world's pairs (``toy``), or a directory holding ``captions.jsonl``
    (lines ``{"image": "relative/path.jpg", "caption": "..."}``) and the images; ``coco`` is ``$COMAT_CACHE/coco``."""

    def __init__(self, source: str, resolution: int, seed: int):
        self.resolution = resolution
        if source in WORLDS:
            images, self.captions = WORLDS.get(source).caption_pairs(WORLD_PAIRS, seed)
            self.images = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)
            return
        root = cache_dir() / "coco" if source == "coco" else Path(source).expanduser()
        index = root / "captions.jsonl"
        if not index.is_file():
            raise ComatError(
                f"image-caption set '{source}' needs {index} (one JSON line per pair: image, caption) next to its "
                "images; pass mixed_latent.data=DIR, or mixed_latent.data=toy"
            )
        try:
            rows = [json.loads(line) for line in index.read_text().splitlines() if line.strip()]
            self.files = [r.get("image") or r["file_name"] for r in rows]
            self.captions = [str(r["caption"]) for r in rows]
        except (json.JSONDecodeError, KeyError, AttributeError):
            raise ComatError(f"{index}: every line must be a JSON object with 'image' and 'caption'") from None
        if not rows:
            raise ComatError(f"{index} holds no image-caption pairs")
        self.root, self.images = root, None

    def _load(self, i: int) -> Tensor:
        import PIL.Image

        try:
            image = PIL.Image.open(self.root / self.files[i]).convert("RGB")
        except OSError as e:
            raise ComatError(f"cannot read image '{self.root / self.files[i]}': {e}") from None
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float().div(255)

    def sample(self, n: int, rng: np.random.Generator) -> tuple[Tensor, list[str]]:
        """``n`` random pairs: images ``[n, 3, R, R]`` in [0, 1] (shortest side resized, centre crop)."""
        idx = rng.choice(len(self.captions), size=n, replace=n > len(self.captions))
        images = [self.images[i] if self.images is not None else self._load(i) for i in idx]
        return torch.stack([self._square(x) for x in images]), [self.captions[i] for i in idx]

    def _square(self, x: Tensor) -> Tensor:
        r = self.resolution
        h, w = x.shape[-2:]
        s = r / min(h, w)
        x = F.interpolate(x[None], size=(max(r, round(h * s)), max(r, round(w * s))), mode="bicubic", antialias=True)
        top, left = (x.shape[-2] - r) // 2, (x.shape[-1] - r) // 2
        return x[0, :, top : top + r, left : left + r].clamp(0, 1)


def generate_real_latents(method: "CoMat", prompts: list[str]) -> Tensor:
    """What the original model (LoRA disabled) samples for ``prompts``: the ``unet-generated`` real latents."""
    cfg, pipe = method.cfg, method.pipe
    gens = [torch.Generator().manual_seed(method.prompt_seed(p)) for p in prompts]
    pipe.unet.disable_adapters()
    try:
        with torch.no_grad(), method.acc.autocast():
            z = initial_latents(pipe, len(prompts), height=cfg.resolution, width=cfg.resolution, generator=gens,
                                scheduler=method.scheduler, dtype=torch.float32)
            return sample_with_grad(pipe.unet, method.scheduler, method.encode(prompts), z, steps=cfg.sample_steps,
                                    guidance=cfg.guidance, generator=gens).float()
    finally:
        pipe.unet.enable_adapters()


class CoMat(FineTuneMethod):
    """CoMat on ``pipe`` (SD1.5 or SDXL family): a LoRA on the UNet, plus the configured discriminator."""

    name = "comat"

    def __init__(self, cfg: TrainConfig, pipe, accelerator, log: Callable[[str], None] = print):
        self.cfg, self.pipe, self.acc, self.log = cfg, pipe, accelerator, log
        self.device = accelerator.device
        self.scheduler = make_scheduler(pipe, cfg.sampler)
        self.null = null_embeds(pipe)
        self._fake: Tensor | None = None
        self._entities: dict[str, list] = {}
        self._fingerprint: str | None = None
        # D copies the pretrained UNet, so it is built before the online LoRA exists.
        self.discriminator = self._build_discriminator() if cfg.discriminator.kind != "none" else None
        spec = LoraSpec(cfg.lora.rank, cfg.lora.alpha, tuple(cfg.lora.target_modules))
        self.lora = fp32_(add_lora(pipe.unet, spec))
        self.captioner = None
        if cfg.captioner.kind != "none":
            from comat.models.captioners import load_captioner

            self.captioner = load_captioner(cfg.captioner.kind, cfg.captioner_model(), device=self.device,
                                            dtype=pipe.unet.dtype)
        self.store = self.segmenter = self.nlp = None
        ac = cfg.attribute_concentration
        if ac.enabled:
            from comat.models.parsing import load_spacy
            from comat.models.segmenter import load_segmenter

            self.nlp = load_spacy(ac.spacy_model)
            self.segmenter = load_segmenter(ac.detector, ac.sam, sam_type=ac.sam_type, device=self.device)
            self.store = AttentionStore(ac.blocks).install(pipe.unet)
        needs_pairs = cfg.mixed_latent.enabled or cfg.discriminator.kind == "unet-real"
        self.pairs = ImageCaptions(cfg.mixed_latent.data, cfg.resolution, cfg.seed) if needs_pairs else None
        if cfg.mixed_latent.enabled and self.captioner is None:
            log("mixed latent is on but captioner.kind=none: mixed latents have nothing to score them; skipped")

    # -- building ------------------------------------------------------------------------------------

    def _build_discriminator(self) -> nn.Module:
        d, pipe = self.cfg.discriminator, self.pipe
        if d.kind == "dino-image":
            ref = self.cfg.dino_model()
            if ref is None:
                raise ComatError("discriminator.kind=dino-image needs discriminator.feature_model (e.g. facebook/dinov2-base)")
            if ref == "tiny":
                net, size = tiny_dinov2(self.cfg.resolution), self.cfg.resolution
                self.log("dino-image: a random tiny DINOv2 (seed 0) is the feature network (toy/test stand-in)")
            else:
                from transformers import Dinov2Model

                net = Dinov2Model.from_pretrained(resolve_model_path(ref), use_safetensors=True)
                size = 224  # DINOv2's own training resolution; position embeddings interpolate
            disc = ImageFeatureDiscriminator(net, image_size=size)
        else:
            if d.model is not None:
                source = load_t2i(d.model, device=self.device, dtype=pipe.unet.dtype)
                unet, null = source.unet, null_embeds(source)[0]
            elif family_of(pipe) == "sdxl":
                raise ComatError("the SDXL discriminator starts from an SD1.5 UNet: set discriminator.model to an SD1.5 pipeline")
            else:
                unet, null = pipe.unet, self.null[0]
            self.scheduler.set_timesteps(self.cfg.sample_steps)
            spec = LoraSpec(d.lora_rank, d.lora_rank, tuple(self.cfg.lora.target_modules))
            disc = LatentDiscriminator(unet, null, timestep=int(self.scheduler.timesteps[-1]), lora=spec,
                                       copy_unet=d.model is None)
        fp32_(disc.trainable_parameters())
        return disc.to(self.device)

    # -- the interface -------------------------------------------------------------------------------

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.lora

    def updates(self) -> list[Update]:
        cfg = self.cfg
        out = [Update("lora", self.lora, self.training_loss, lr=cfg.lr, grad_clip=cfg.grad_clip)]
        if self.discriminator is not None:
            d = cfg.discriminator
            out.append(Update("discriminator", self.discriminator.trainable_parameters(), self.discriminator_loss,
                              lr=d.lr, betas=tuple(d.betas), grad_clip=d.grad_clip))
        return out

    def state_modules(self) -> dict[str, nn.Module]:
        mods = {"unet": self.pipe.unet}
        if self.discriminator is not None:
            mods["discriminator"] = self.discriminator
        return mods

    def save(self, directory: str | os.PathLike) -> Path:
        return save_lora(self.pipe, directory)

    @classmethod
    def load(cls, pipe, directory: str | os.PathLike) -> None:
        load_lora(pipe, directory)

    # -- generator step ------------------------------------------------------------------------------

    def encode(self, prompts: list[str]):
        r = self.cfg.resolution
        return encode(self.pipe, prompts, self.null, height=r, width=r)

    def decode(self, latents: Tensor) -> Tensor:
        # The VAE stays float32 outside autocast: the SDXL VAE overflows in fp16.
        with torch.autocast(self.device.type, enabled=False):
            return decode(self.pipe.vae, latents.float(), checkpointing=self.cfg.vae_checkpointing)

    def _i2t(self, images: Tensor, texts: list[str], generator: torch.Generator) -> Tensor:
        c = self.cfg.captioner
        loss = concept_activation_loss(self.captioner, images, texts, prefix=c.prefix, reduction=c.reduction,
                                       label_smoothing=c.label_smoothing, jitter=c.jitter, generator=generator)
        return c.weight * loss

    def training_loss(self, batch: Batch) -> Terms:
        cfg, g = self.cfg, batch.generator
        b, ac = len(batch.prompts), cfg.attribute_concentration
        z = initial_latents(self.pipe, b, height=cfg.resolution, width=cfg.resolution, generator=g,
                            scheduler=self.scheduler, dtype=torch.float32)
        grad_steps = grad_step_indices(cfg.sample_steps, cfg.grad_steps, g, first=cfg.grad_skip)
        ac_steps = sorted(int(s) for s in batch.rng.choice(grad_steps, ac.steps, replace=False)) if self.store else []
        if self.store is not None:
            self.store.clear()
        embeds = self.encode(batch.prompts)
        with self.acc.autocast():
            if self.store is not None:
                with self.store.capturing_steps(ac_steps, rows=cond_rows(b, cfg.guidance)) as hook:
                    latents = self._sample(embeds, z, grad_steps, g, hook)
            else:
                latents = self._sample(embeds, z, grad_steps, g, None)
        images = self.decode(latents)
        terms: Terms = {}
        with self.acc.autocast():
            if self.captioner is not None:
                terms["i2t"] = self._i2t(images, batch.prompts, g)
            if self.store is not None:
                terms.update(self._attribute_concentration(images, batch.prompts, ac_steps))
            if self.discriminator is not None:
                fake = images if cfg.discriminator.kind == "dino-image" else latents
                terms["adv"] = cfg.discriminator.weight * generator_adversarial_loss(self.discriminator, fake)
                self._fake = fake.detach()
            if cfg.mixed_latent.enabled and self.captioner is not None:
                terms["i2t_mixed"] = self._mixed_latent(batch)
        return terms

    def _sample(self, embeds, z: Tensor, grad_steps, g, hook, start: int = 0) -> Tensor:
        cfg = self.cfg
        return sample_with_grad(self.pipe.unet, self.scheduler, embeds, z, steps=cfg.sample_steps,
                                guidance=cfg.guidance, grad_steps=grad_steps, stop_grad=cfg.stop_grad,
                                generator=g, on_step=hook, start=start)

    def entities(self, prompt: str) -> list:
        if prompt not in self._entities:
            from comat.models.parsing import parse_entities

            official = self.cfg.attribute_concentration.variant == "official"
            self._entities[prompt] = parse_entities(prompt, self.pipe.tokenizer, self.nlp, official=official)
        return self._entities[prompt]

    def _attribute_concentration(self, images: Tensor, prompts: list[str], steps: list[int]) -> Terms:
        ac = self.cfg.attribute_concentration
        ents = [self.entities(p) for p in prompts]
        # The segmenter sees the detached image: masks are targets, not a path for gradient.
        masks = [list(self.segmenter(img.detach(), [e.noun for e in es])) if es else [] for img, es in zip(images, ents)]
        indices = [[e.token_indices for e in es] for es in ents]
        pos = neg = images.new_zeros(())
        for step in steps:
            groups = [self.store.aggregate(step)] if ac.variant == "paper" else list(self.store.by_resolution(step).values())
            for attn in groups:
                p, n = attribute_concentration_loss(attn, masks, indices, alpha=ac.alpha, beta=ac.beta, variant=ac.variant)
                pos, neg = pos + p, neg + n
        skipped = sum(1 for es in ents if not es)
        return {"ac_pos": pos, "ac_neg": neg, "_ac_skipped": torch.tensor(float(skipped))}

    def _mixed_latent(self, batch: Batch) -> Tensor:
        cfg, ml, g = self.cfg, self.cfg.mixed_latent, batch.generator
        images, captions = self.pairs.sample(ml.batch, batch.rng)
        with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
            z0 = encode_images(self.pipe.vae, images.to(self.device), generator=g).float()
        self.scheduler.set_timesteps(cfg.sample_steps, device=self.device)
        timesteps = self.scheduler.timesteps
        tau = int(batch.rng.integers(ml.tau_min, ml.tau_max + 1))
        start = int((timesteps - tau).abs().argmin())
        noise = torch.randn(z0.shape, generator=g).to(z0)
        zt = self.scheduler.add_noise(z0, noise, timesteps[start : start + 1])
        first = max(start, cfg.grad_skip)
        grad_steps = grad_step_indices(cfg.sample_steps, min(cfg.grad_steps, cfg.sample_steps - first), g, first=first)
        latents = self._sample(self.encode(captions), zt, grad_steps, g, None, start=start)
        return self._i2t(self.decode(latents), captions, g)

    # -- discriminator step --------------------------------------------------------------------------

    def prompt_seed(self, prompt: str) -> int:
        return int(hashlib.sha256(f"{self.cfg.seed}|{prompt}".encode()).hexdigest()[:8], 16)

    def _cache_key(self, prompt: str) -> str:
        cfg = self.cfg
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(cfg.model)
        key = dict(model=self._fingerprint, prompt=prompt, seed=self.prompt_seed(prompt), sampler=cfg.sampler,
                   steps=cfg.sample_steps, guidance=cfg.guidance, resolution=cfg.resolution,
                   dtype=str(self.pipe.unet.dtype))
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()

    def real_latents(self, prompts: list[str]) -> Tensor:
        """The original model's latents for ``prompts``, from the disk cache or generated (and cached) now."""
        root = cache_dir() / "real-latents"
        files = {p: root / f"{self._cache_key(p)}.safetensors" for p in prompts}
        missing = [p for p in dict.fromkeys(prompts) if not files[p].is_file()]
        for i in range(0, len(missing), self.cfg.batch):
            chunk = missing[i : i + self.cfg.batch]
            for p, z in zip(chunk, generate_real_latents(self, chunk)):
                tmp = files[p].with_suffix(f".tmp{os.getpid()}")
                root.mkdir(parents=True, exist_ok=True)
                save_file({"latents": z.cpu().contiguous()}, str(tmp), metadata={"prompt": p})
                os.replace(tmp, files[p])
        return torch.stack([load_file(str(files[p]))["latents"] for p in prompts]).to(self.device)

    def discriminator_loss(self, batch: Batch) -> Terms:
        kind = self.cfg.discriminator.kind
        with torch.no_grad():
            if kind == "unet-real":
                images, _ = self.pairs.sample(len(batch.prompts), batch.rng)
                with torch.autocast(self.device.type, enabled=False):
                    real = encode_images(self.pipe.vae, images.to(self.device), generator=batch.generator).float()
            else:
                real = self.real_latents(batch.prompts)
                if kind == "dino-image":
                    real = self.decode(real)
        with self.acc.autocast():
            return {"d": discriminator_loss(self.discriminator, self._fake, real)}
