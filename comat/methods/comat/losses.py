"""CoMat's loss terms: concept activation, attribute concentration, adversarial.

Attribute concentration, ``variant="paper"`` (eq. 4-5 of the paper, in its notation). For one
sample with entities ``e_1..e_N`` (token positions) and masks ``M_i`` at the attention resolution, ``A_k(u, v)``
the cross-attention of token ``k`` (softmax over tokens), ``S_k = sum_{u,v} A_k(u, v)`` and ``|A|`` the number of
pixels::

    L_pos = -1/N sum_i sum_{M_i=1} ( alpha * sum_{k in e_i} A_k(u,v) / S_k + beta * log(sum_{k in e_i} A_k(u,v)) / |A| )
    L_neg = -1/N sum_i sum_{M_i=0} ( alpha * sum_{k in e_i} -A_k(u,v) / S_k
                                     + beta * log(1 - sum_{k in e_i} A_k(u,v)) / |A| )

An absent entity (all-zero mask) has no ``M=1`` pixel, so only its negative term remains. Logs are of values clamped
to ``eps``. The batch value is the sum over samples divided by the batch size (a sample without entities adds 0, as
in the official code). Masks are resized to the attention map with nearest-neighbour sampling.

``variant="official"`` is our reading of the official code (``attn_utils/tc_loss_utils.py`` from TokenCompose,
called per sample, step and resolution group by ``GsamSegModel.get_mask_loss``):

* token term: for every layer of the group and every entity, ``1/|e_i| sum_{k in e_i} (1 - mean_heads(f_hk))**2``
  with ``f_hk = sum(A_hk * M_i) / sum(A_hk)`` the inside fraction of head ``h``; summed over the group's layers,
  divided by ``N``;
* pixel term: BCE between ``sum_{k in e_i}`` of the map averaged over heads and layers and the mask (mean over
  pixels; torch clamps the log at -100), divided by ``N``;
* masks resized with bilinear antialiased interpolation, then ``> 0`` (torchvision ``Resize`` on tensors), so a
  cell touched by the mask at all counts as inside;
* weights: the official ``mask_token_loss_weight`` and ``mask_pixel_loss_weight`` are 1e-3 and 5e-5, the paper's
  alpha and beta, so the returned pair is ``(alpha * token, beta * pixel)``.

The official code sums these over the r captured steps and over its resolution groups (SD1.5: mid 8, up 16/32/64;
SDXL: mid 16, up 16/32); the caller does that by calling this once per group (``AttentionStore.by_resolution``).

Adversarial (fidelity preservation): :class:`LatentDiscriminator` is the paper's UNet discriminator; the losses are
the non-saturating BCE pair of the official code (``BCEWithLogitsLoss``, mean over latent pixels).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0
from torch import Tensor, nn

from comat.core.errors import ComatError
from comat.models.t2i import LoraSpec, add_lora

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VARIANTS = ("paper", "official")

__all__ = [
    "ImageFeatureDiscriminator",
    "LatentDiscriminator",
    "attribute_concentration_loss",
    "concept_activation_loss",
    "discriminator_loss",
    "frozen",
    "generator_adversarial_loss",
    "resize_masks",
]


# ------------------------------------------------------------------------------- concept activation


def concept_activation_loss(captioner: Any, images: Tensor, prompts: Sequence[str], **logp_options: Any) -> Tensor:
    """``L_i2t = mean_b -log p_C(prompt_b | image_b)`` from a frozen captioner (paper eq. 2).

    ``logp_options`` go to ``captioner.log_prob``: ``prefix``, ``reduction`` (``"sum"``: eq. 2; ``"mean"``: per-token
    mean), ``label_smoothing`` (0.1 with ``"mean"`` reproduces the official BLIP loss), ``jitter``, ``generator``.
    """
    return -captioner.log_prob(images, list(prompts), **logp_options).mean()


# --------------------------------------------------------------------------- attribute concentration


def resize_masks(masks: Sequence[Tensor], size: tuple[int, int], *, mode: str = "nearest") -> Tensor:
    """Stack boolean masks ``[H0, W0]`` resized to ``size`` as floats ``[N, H, W]`` in {0, 1}.

    ``mode="nearest"``: nearest-neighbour; ``"official"``: bilinear antialiased resize then ``> 0``.
    """
    if not masks:
        return torch.zeros(0, *size)
    out = []
    for m in masks:
        if m.ndim != 2:
            raise ComatError(f"an entity mask must be a 2-D [H, W] tensor, got shape {tuple(m.shape)}")
        m = m.float()[None, None]
        if tuple(m.shape[-2:]) != tuple(size):
            if mode == "official":
                m = (F.interpolate(m, size=size, mode="bilinear", antialias=True, align_corners=False) > 0).float()
            else:
                m = F.interpolate(m, size=size, mode="nearest")
        out.append(m[0, 0] > 0.5)
    return torch.stack(out).float()


def _as_layers(attn: Tensor | Sequence[Tensor]) -> list[Tensor]:
    """Attention input as a list of ``[B, heads, H, W, T]`` layers."""
    layers = [attn] if isinstance(attn, Tensor) else list(attn)
    if not layers:
        raise ComatError("attribute concentration got no attention maps")
    out = []
    for a in layers:
        if a.ndim == 4:
            a = a.unsqueeze(1)
        if a.ndim != 5:
            raise ComatError(f"attention maps must be [B, H, W, T] or [B, heads, H, W, T], got {tuple(a.shape)}")
        # logs of fp16 probabilities near 0 or 1 lose the terms this loss is made of
        out.append(a.float() if a.element_size() < 4 else a)
    if len({tuple(a.shape[:1]) + tuple(a.shape[2:]) for a in out}) != 1:
        raise ComatError("attention layers passed together must share batch, resolution and token count")
    return out


def _paper_terms(a: Tensor, masks: Tensor, groups: list[tuple[int, ...]], alpha: float, beta: float, eps: float):
    """``(L_pos, L_neg)`` of one sample: ``a`` ``[H, W, T]``, ``masks`` ``[N, H, W]``."""
    n_pix = a.shape[0] * a.shape[1]
    pos, neg = a.new_zeros(()), a.new_zeros(())
    for m, idx in zip(masks, groups):
        ae = a[..., list(idx)]  # [H, W, k]
        frac = (ae / ae.sum((0, 1)).clamp_min(eps)).sum(-1)  # sum_k A_k(u,v) / S_k
        s = ae.sum(-1)  # sum_k A_k(u,v)
        inside, outside = m, 1.0 - m
        pos = pos + alpha * (frac * inside).sum() + beta * (torch.log(s.clamp_min(eps)) * inside).sum() / n_pix
        neg = neg + alpha * (-frac * outside).sum() + beta * (torch.log((1 - s).clamp_min(eps)) * outside).sum() / n_pix
    n = len(groups)
    return -pos / n, -neg / n


def _official_terms(layers: list[Tensor], masks: Tensor, groups: list[tuple[int, ...]], eps: float):
    """``(token, pixel)`` of one sample: ``layers`` of ``[heads, H, W, T]``, ``masks`` ``[N, H, W]``."""
    token = layers[0].new_zeros(())
    for a in layers:
        for m, idx in zip(masks, groups):
            ae = a[..., list(idx)]  # [heads, H, W, k]
            inside = (ae * m[None, :, :, None]).sum((1, 2)) / ae.sum((1, 2)).clamp_min(eps)  # [heads, k]
            token = token + ((1.0 - inside.mean(0)) ** 2).mean()
    avg = torch.stack([a.mean(0) for a in layers]).mean(0)  # heads, then layers: [H, W, T]
    pixel = layers[0].new_zeros(())
    for m, idx in zip(masks, groups):
        s = avg[..., list(idx)].sum(-1).clamp(0.0, 1.0)  # rounding can push a sum of probabilities past 1
        pixel = pixel + F.binary_cross_entropy(s, m.to(s.dtype))
    n = len(groups)
    return token / n, pixel / n


def attribute_concentration_loss(
    attn: Tensor | Sequence[Tensor],
    masks: Sequence[Sequence[Tensor]],
    token_indices: Sequence[Sequence[Sequence[int]]],
    *,
    alpha: float = 1e-3,
    beta: float = 5e-5,
    variant: str = "paper",
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """Attribute-concentration terms of a batch; see the module docstring for both variants' formulas.

    ``attn``: conditional-half cross-attention, softmax over tokens, ``[B, H, W, T]`` (heads averaged, e.g.
    ``AttentionStore.aggregate``), or ``[B, heads, H, W, T]``, or a list of such layers at one resolution
    (``AttentionStore.by_resolution``; the paper variant averages heads and layers first, the official variant
    needs them separate). ``masks[b][i]``: boolean ``[H0, W0]`` segmentation of entity ``i`` of sample ``b``
    (all False when absent). ``token_indices[b][i]``: its token positions (noun and attributes,
    :attr:`comat.models.parsing.Entity.token_indices`). Entities without tokens are ignored.

    Returns ``(L_pos, L_neg)`` for ``"paper"`` and ``(alpha * token, beta * pixel)`` for ``"official"``; their sum is
    the term to add to the generator loss.
    """
    if variant not in VARIANTS:
        raise ComatError(f"unknown attribute-concentration variant '{variant}'; use one of {', '.join(VARIANTS)}")
    layers = _as_layers(attn)
    batch, size, n_tokens = layers[0].shape[0], tuple(layers[0].shape[2:4]), layers[0].shape[-1]
    if len(masks) != batch or len(token_indices) != batch:
        raise ComatError(f"attention batch {batch} but {len(masks)} mask lists and {len(token_indices)} index lists")
    first, second = layers[0].new_zeros(()), layers[0].new_zeros(())
    for b in range(batch):
        if len(masks[b]) != len(token_indices[b]):
            raise ComatError(f"sample {b}: {len(masks[b])} masks for {len(token_indices[b])} entities")
        keep = [i for i, idx in enumerate(token_indices[b]) if len(idx) > 0]
        if not keep:
            continue
        groups = [tuple(int(k) for k in token_indices[b][i]) for i in keep]
        if any(not 0 <= k < n_tokens for g in groups for k in g):
            raise ComatError(f"sample {b}: token index out of range for {n_tokens} attention tokens")
        m = resize_masks([masks[b][i] for i in keep], size, mode="official" if variant == "official" else "nearest")
        m = m.to(device=layers[0].device, dtype=layers[0].dtype)
        if variant == "paper":
            a = torch.stack([layer[b] for layer in layers]).mean((0, 1))  # layers, heads -> [H, W, T]
            pos, neg = _paper_terms(a, m, groups, alpha, beta, eps)
        else:
            token, pixel = _official_terms([layer[b] for layer in layers], m, groups, eps)
            pos, neg = alpha * token, beta * pixel
        first, second = first + pos, second + neg
    return first / batch, second / batch


# ----------------------------------------------------------------------------------- discriminators


@contextlib.contextmanager
def frozen(params: Iterable[nn.Parameter]) -> Iterator[None]:
    """Turn ``requires_grad`` off for ``params`` inside the block (gradient still flows *through* them)."""
    params = list(params)
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


class LatentDiscriminator(nn.Module):
    """The paper's latent discriminator: a pretrained UNet (frozen) with a LoRA, plus a per-pixel ``Linear(4 -> 1)``.

    The UNet runs once at ``timestep`` (the sampler's last, smallest timestep, e.g. ``scheduler.timesteps[-1]``)
    with the null-text embedding ``null_embeds`` ``[1, L, D]``; its 4-channel output at every latent pixel goes
    through the head. The paper initialises it from the SD1.5 UNet for SDXL too (it is convolutional, so 128x128
    SDXL latents fit); pass that UNet and its own null embedding. ``copy_unet`` deep-copies the UNet so the
    caller's model is untouched; it must not carry a LoRA already. ``DDPM``/``DDIM`` ``scale_model_input`` is the
    identity, so the latents go in as they are.
    """

    def __init__(
        self,
        unet: nn.Module,
        null_embeds: Tensor,
        *,
        timestep: int,
        lora: LoraSpec = LoraSpec(),
        copy_unet: bool = True,
        adapter_name: str = "discriminator",
    ):
        super().__init__()
        if getattr(unet, "peft_config", None):
            raise ComatError("the discriminator needs a UNet without LoRA adapters; build it from the pretrained UNet")
        if getattr(unet.config, "addition_embed_type", None) is not None:
            raise ComatError(
                "the latent discriminator takes an SD1.5-family UNet (no added conditions); pass the SD1.5 UNet"
            )
        self.unet = copy.deepcopy(unet) if copy_unet else unet
        # plain SDPA, even if the source UNet carried attention-capture processors
        self.unet.set_attn_processor(AttnProcessor2_0())
        self._lora = add_lora(self.unet, lora, adapter_name=adapter_name)
        channels = self.unet.config.out_channels
        self.head = nn.Linear(channels, 1)
        self.timestep = int(timestep)
        self.register_buffer("null_embeds", null_embeds.detach().clone(), persistent=False)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """D's LoRA and head: what the discriminator optimiser updates."""
        return [*self._lora, *self.head.parameters()]

    def forward(self, latents: Tensor) -> Tensor:
        """Logits ``[B, h, w]``: one real/fake score per latent pixel."""
        dtype = self.unet.dtype
        ehs = self.null_embeds.to(device=latents.device, dtype=dtype).expand(latents.shape[0], -1, -1)
        out = self.unet(latents.to(dtype), self.timestep, encoder_hidden_states=ehs, return_dict=False)[0]
        return self.head(out.permute(0, 2, 3, 1).to(self.head.weight.dtype)).squeeze(-1)


class ImageFeatureDiscriminator(nn.Module):
    """A frozen image feature network (e.g. ``transformers.Dinov2Model``) plus a trainable head, on images in [0, 1].

    Images are resized to ``image_size`` (if given, bicubic antialiased) and normalised with ``mean``/``std``;
    ``features(net, pixel_values)`` returns ``[B, N, C]`` tokens (default: ``last_hidden_state``) and the head
    maps each to one logit, so the output is ``[B, N]``. ``head`` defaults to ``Linear(hidden_size, 1)``.
    """

    def __init__(
        self,
        feature_net: nn.Module,
        head: nn.Module | None = None,
        *,
        image_size: int | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        features: Callable[[nn.Module, Tensor], Tensor] | None = None,
    ):
        super().__init__()
        self.feature_net = feature_net.requires_grad_(False).eval()
        self.head = head if head is not None else nn.Linear(feature_net.config.hidden_size, 1)
        self.image_size = image_size
        self.features = features or (lambda net, x: net(pixel_values=x).last_hidden_state)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> "ImageFeatureDiscriminator":
        # the frozen feature network never switches dropout on
        super().train(mode)
        self.feature_net.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())

    def forward(self, images: Tensor) -> Tensor:
        x = images.float()
        if self.image_size is not None and tuple(x.shape[-2:]) != (self.image_size,) * 2:
            x = F.interpolate(x, size=(self.image_size,) * 2, mode="bicubic", align_corners=False, antialias=True)
        x = (x - self.mean) / self.std
        dtype = next(self.feature_net.parameters()).dtype
        feats = self.features(self.feature_net, x.to(dtype))
        return self.head(feats.to(next(self.head.parameters()).dtype)).squeeze(-1)


Discriminator = LatentDiscriminator | ImageFeatureDiscriminator


def generator_adversarial_loss(discriminator: Discriminator, fake: Tensor) -> Tensor:
    """Non-saturating generator loss ``BCE(D(fake), 1)``; D's parameters get no gradient, ``fake`` does."""
    with frozen(discriminator.trainable_parameters()):
        logits = discriminator(fake).float()
    return F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))


def discriminator_loss(discriminator: Discriminator, fake: Tensor, real: Tensor) -> Tensor:
    """``BCE(D([fake; real]), [0; 1])`` over one batch, mean over all outputs; ``fake`` is detached here."""
    if fake.shape[1:] != real.shape[1:]:
        raise ComatError(f"fake {tuple(fake.shape)} and real {tuple(real.shape)} inputs differ in shape")
    logits = discriminator(torch.cat([fake.detach(), real.detach()])).float()
    target = torch.zeros_like(logits)
    target[fake.shape[0] :] = 1.0
    return F.binary_cross_entropy_with_logits(logits, target)
