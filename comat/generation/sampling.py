"""Differentiable sampling for CoMat's training step, SD1.5 and SDXL families.

The online model samples an image from pure noise with the full sampler, but only ``K`` of the ``T`` UNet calls
build a graph (:func:`grad_step_indices` draws them, evenly spaced with a random phase). The scheduler update
``z_{t-1} = a_t z_t + b_t eps + sigma_t n`` is linear and stays differentiable at every step, so the gradient of a
loss on the final latents reaches the UNet of each grad step through the products of the later steps' ``a``
coefficients. With ``stop_grad`` (DRTune) a grad-step UNet sees ``z_t.detach()``, so nothing flows back through the
UNet Jacobian into earlier steps; without it, the gradient of a grad step also reaches the UNet calls of earlier
grad steps through this one's input.

One code path serves both families: :func:`encode` calls the pipeline's own ``encode_prompt`` (and, for SDXL,
``_get_add_time_ids``), and :class:`PromptEmbeds` hands the UNet ``encoder_hidden_states`` and, when the family
needs them, ``added_cond_kwargs``. The loop itself needs only a UNet (possibly wrapped by accelerate) and a
diffusers scheduler; DDPM and DDIM are the tested ones (``scheduler.step`` is a differentiable torch expression for
both; DDPM's step noise comes from ``generator``, a list of generators gives each sample its own stream, as in the
pipelines).

Classifier-free guidance follows diffusers: the UNet batch is ``[uncond; cond]`` and guidance is on when
``guidance > 1``; the unconditional embedding is the pipeline's null embedding (:func:`null_embeds`), computed once.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Callable, Collection, Sequence

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from comat.core.errors import ComatError
from comat.models.t2i import family_of

Generator = torch.Generator | list[torch.Generator] | None
StepHook = Callable[[int, Tensor, bool], None]
SCHEDULERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}

__all__ = [
    "PromptEmbeds",
    "cond_rows",
    "decode",
    "encode",
    "encode_images",
    "grad_step_indices",
    "initial_latents",
    "make_scheduler",
    "null_embeds",
    "sample_with_grad",
]


def grad_step_indices(T: int, K: int, generator: torch.Generator | None = None, first: int = 0) -> list[int]:
    """The ``K`` gradient-enabled step indices among steps ``first .. T-1`` of a ``T``-step schedule: evenly spaced,
    random phase.

    Over the ``n = T - first`` eligible steps, ``interval = n // K``, ``start ~ U{0 .. n - interval*(K-1) - 1}``,
    steps ``first + start, first + start + interval, ...`` (the official code's rule, with ``first = 0``). When ``n``
    is not a multiple of ``K`` the range can hold ``K + 1`` indices; only the first ``K`` are kept, so exactly ``K``
    steps get a gradient.
    """
    n = T - first
    if K < 0 or T <= 0 or not 0 <= first < T:
        raise ComatError(f"need T > 0 sampling steps, 0 <= first < T and K >= 0 grad steps, got T={T}, first={first}, K={K}")
    if K > n:
        raise ComatError(f"cannot enable gradients at K={K} of only {n} sampling steps; lower K")
    if K == 0:
        return []
    interval = n // K
    high = n - interval * (K - 1)  # exclusive bound of start
    device = generator.device if generator is not None else "cpu"
    start = first + int(torch.randint(0, high, (1,), generator=generator, device=device))
    return list(range(start, T, interval))[:K]


def cond_rows(batch: int, guidance: float) -> slice:
    """Rows of the UNet batch that carry the prompt: the second half under CFG (``[uncond; cond]``), else all."""
    return slice(batch, 2 * batch) if guidance > 1.0 else slice(0, batch)


# ------------------------------------------------------------------------------------------- prompts


@dataclasses.dataclass
class PromptEmbeds:
    """Text conditioning of a batch, with the null (unconditional) half for classifier-free guidance.

    ``cond``/``uncond``: ``[B, L, D]``. SDXL only: ``pooled``/``uncond_pooled`` ``[B, P]`` and ``time_ids``
    ``[B, 6]`` (the same ids serve both halves, as in the pipeline without negative size conditioning).
    """

    cond: Tensor
    uncond: Tensor
    pooled: Tensor | None = None
    uncond_pooled: Tensor | None = None
    time_ids: Tensor | None = None

    def __len__(self) -> int:
        return self.cond.shape[0]

    @property
    def is_sdxl(self) -> bool:
        return self.pooled is not None

    def unet_kwargs(self, guidance: bool) -> dict:
        """Keyword arguments of the UNet call for the ``[uncond; cond]`` batch (``guidance``) or ``cond`` alone."""
        ehs = torch.cat([self.uncond, self.cond]) if guidance else self.cond
        kwargs: dict = {"encoder_hidden_states": ehs}
        if self.is_sdxl:
            pooled = torch.cat([self.uncond_pooled, self.pooled]) if guidance else self.pooled
            time_ids = torch.cat([self.time_ids, self.time_ids]) if guidance else self.time_ids
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
        return kwargs

    def _tensors(self) -> list[Tensor | None]:
        # not dataclasses.astuple: it deep-copies, which breaks (or refuses) tensors that carry a graph
        return [getattr(self, f.name) for f in dataclasses.fields(self)]

    def to(self, *args, **kwargs) -> "PromptEmbeds":
        return PromptEmbeds(*(None if t is None else t.to(*args, **kwargs) for t in self._tensors()))

    def __getitem__(self, index) -> "PromptEmbeds":
        """A sub-batch (``index``: slice, list or tensor of rows)."""
        return PromptEmbeds(*(None if t is None else t[index] for t in self._tensors()))


def _device(pipe: DiffusionPipeline) -> torch.device:
    return pipe._execution_device


def null_embeds(pipe: DiffusionPipeline, *, encode_empty: bool | None = None) -> tuple[Tensor, Tensor | None]:
    """The pipeline's unconditional embedding ``[1, L, D]`` (and SDXL pooled ``[1, P]``): compute once, reuse.

    It is what the pipeline itself uses with no negative prompt: the encoded empty prompt for SD; for SDXL zeros
    when the pipeline's ``force_zeros_for_empty_prompt`` is set (the default), so sampling matches
    ``pipe(...)``. ``encode_empty=True`` encodes ``""`` for SDXL instead, as the official CoMat SDXL code does.
    """
    with torch.no_grad():
        if family_of(pipe) == "sdxl":
            zeros = pipe.config.force_zeros_for_empty_prompt if encode_empty is None else not encode_empty
            embeds, _, pooled, _ = pipe.encode_prompt(
                "", device=_device(pipe), num_images_per_prompt=1, do_classifier_free_guidance=False
            )
            return (torch.zeros_like(embeds), torch.zeros_like(pooled)) if zeros else (embeds, pooled)
        return pipe.encode_prompt("", _device(pipe), 1, False)[0], None


def encode(
    pipe: DiffusionPipeline,
    prompts: Sequence[str],
    null: tuple[Tensor, Tensor | None] | None = None,
    *,
    height: int | None = None,
    width: int | None = None,
    grad: bool = False,
) -> PromptEmbeds:
    """Encode ``prompts`` with the pipeline's text encoder(s); ``null`` from :func:`null_embeds` (computed if None).

    ``height``/``width`` (pixels) only matter for SDXL's size conditioning (default: the pipeline's native size).
    ``grad=False`` runs the frozen text encoders without a graph.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ComatError("encode() got no prompts; pass at least one")
    if null is None:
        null = null_embeds(pipe)
    device = _device(pipe)
    b = len(prompts)
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        if family_of(pipe) != "sdxl":
            cond = pipe.encode_prompt(prompts, device, 1, False)[0]
            return PromptEmbeds(cond, null[0].to(cond).expand(b, -1, -1))
        cond, _, pooled, _ = pipe.encode_prompt(
            prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
    size = pipe.default_sample_size * pipe.vae_scale_factor
    size = (height or size, width or size)
    proj = pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 is not None else int(pooled.shape[-1])
    time_ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=cond.dtype, text_encoder_projection_dim=proj)
    return PromptEmbeds(
        cond,
        null[0].to(cond).expand(b, -1, -1),
        pooled,
        null[1].to(pooled).expand(b, -1),
        time_ids.to(device).repeat(b, 1),
    )


# ------------------------------------------------------------------------------------------ sampling


def make_scheduler(pipe: DiffusionPipeline, kind: str = "ddpm") -> DDPMScheduler | DDIMScheduler:
    """A fresh DDPM or DDIM scheduler from the pipeline's scheduler config (the pipeline's own is left alone)."""
    if kind not in SCHEDULERS:
        raise ComatError(f"unknown sampler '{kind}'; use one of {', '.join(SCHEDULERS)}")
    extra = {}
    # A learned-variance model's second output half is ignored in training samplers (as in the official code).
    if pipe.scheduler.config.get("variance_type") in ("learned", "learned_range"):
        extra["variance_type"] = "fixed_small"
    return SCHEDULERS[kind].from_config(pipe.scheduler.config, **extra)


def initial_latents(
    pipe: DiffusionPipeline,
    batch: int,
    *,
    height: int,
    width: int,
    generator: Generator = None,
    scheduler=None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Pure-noise start latents ``[B, C, H/f, W/f]``, drawn exactly as the pipeline's ``prepare_latents`` does."""
    f = pipe.vae_scale_factor
    if height % f or width % f:
        raise ComatError(f"height and width must be multiples of {f} (the VAE downsampling), got {height}x{width}")
    shape = (batch, pipe.unet.config.in_channels, height // f, width // f)
    z = randn_tensor(shape, generator=generator, device=_device(pipe), dtype=dtype or pipe.unet.dtype)
    return z * (scheduler or pipe.scheduler).init_noise_sigma


def sample_with_grad(
    unet: torch.nn.Module,
    scheduler,
    embeds: PromptEmbeds,
    latents: Tensor,
    *,
    steps: int = 50,
    guidance: float = 7.5,
    grad_steps: Collection[int] = (),
    stop_grad: bool = True,
    generator: Generator = None,
    on_step: StepHook | None = None,
    start: int = 0,
) -> Tensor:
    """Run the sampler from ``latents`` and return the final latents, differentiable through ``grad_steps``.

    ``grad_steps``: indices into the ``steps``-step schedule whose UNet call builds a graph; every other UNet call
    runs under ``no_grad``. The scheduler update always runs with autograd on, so once a grad step has happened
    the latents carry a graph through the linear updates (before it they carry none, unless ``latents`` itself
    requires grad). ``stop_grad``: a grad-step UNet sees ``z_t.detach()`` (paper/DRTune, official SDXL); off,
    it sees ``z_t`` (official SD1.5). ``generator``: DDPM step noise (same generator(s) as for the start noise
    reproduces ``pipe(..., generator=...)``). ``on_step(i, t, is_grad)`` is called before each UNet call, e.g.
    to turn attention capture on at chosen steps. ``start``: first schedule index to run (``latents`` must then
    be noised to ``timesteps[start]``, as for mixed latents). An outer ``torch.no_grad()`` disables all graphs.
    """
    grad_steps = set(int(i) for i in grad_steps)
    if any(not 0 <= i < steps for i in grad_steps):
        raise ComatError(f"grad steps {sorted(grad_steps)} fall outside the {steps}-step schedule")
    if not 0 <= start < steps:
        raise ComatError(f"start index {start} is outside the {steps}-step schedule")
    if len(embeds) != latents.shape[0]:
        raise ComatError(f"{len(embeds)} prompt embeddings for {latents.shape[0]} latents; pass one per sample")
    scheduler.set_timesteps(steps, device=latents.device)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    cfg = guidance > 1.0
    unet_kwargs = embeds.unet_kwargs(cfg)
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    autograd = torch.is_grad_enabled()
    for i, t in enumerate(scheduler.timesteps):
        if i < start:
            continue
        is_grad = autograd and i in grad_steps
        if on_step is not None:
            on_step(i, t, is_grad)
        z_in = latents.detach() if (stop_grad or not is_grad) else latents
        model_in = scheduler.scale_model_input(torch.cat([z_in, z_in]) if cfg else z_in, t)
        with torch.set_grad_enabled(is_grad):
            eps = unet(model_in, t, return_dict=False, **unet_kwargs)[0]
        if cfg:
            eps_uncond, eps_cond = eps.chunk(2)
            eps = eps_uncond + guidance * (eps_cond - eps_uncond)
        latents = scheduler.step(eps.to(latents.dtype), t, latents, **step_kwargs, return_dict=False)[0]
    return latents


# ------------------------------------------------------------------------------------------------ VAE


def _vae_stats(vae, like: Tensor) -> tuple[Tensor, Tensor] | None:
    cfg = vae.config
    mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    if mean is None or std is None:
        return None
    shape = (1, len(mean), 1, 1)
    return torch.tensor(mean).view(shape).to(like), torch.tensor(std).view(shape).to(like)


def decode(vae, latents: Tensor, *, checkpointing: bool = False, clamp: bool = True) -> Tensor:
    """VAE-decode latents to images in ``[0, 1]`` (``x / 2 + 0.5``, clamped), differentiable in ``latents``.

    Latents are unscaled as the pipelines do (``/ scaling_factor``; SDXL-style ``latents_mean``/``latents_std``
    when the VAE config has them). ``checkpointing`` recomputes the decoder in backward instead of keeping its
    activations (the largest memory item of a 512 px step). ``clamp`` zeroes the gradient of out-of-range pixels,
    like every sampler's output clamp; turn it off to keep it.
    """
    z = latents.to(vae.dtype)
    stats = _vae_stats(vae, z)
    sf = vae.config.scaling_factor
    z = z * stats[1] / sf + stats[0] if stats is not None else z / sf

    def run(z: Tensor) -> Tensor:
        return vae.decode(z, return_dict=False)[0]

    x = checkpoint(run, z, use_reentrant=False) if checkpointing and torch.is_grad_enabled() else run(z)
    x = x / 2 + 0.5
    return x.clamp(0, 1) if clamp else x


def encode_images(vae, images: Tensor, *, generator: Generator = None, sample: bool = True) -> Tensor:
    """Images in ``[0, 1]`` -> scaled latents (posterior sample, or its mean with ``sample=False``)."""
    dist = vae.encode((images * 2 - 1).to(vae.dtype)).latent_dist
    z = dist.sample(generator) if sample else dist.mode()
    stats = _vae_stats(vae, z)
    sf = vae.config.scaling_factor
    return (z - stats[0]) * sf / stats[1] if stats is not None else z * sf
