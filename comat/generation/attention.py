"""Cross-attention capture for attribute concentration.

Only the cross-attention (``attn2``) layers that a loss needs get a capturing processor, and it computes the
attention probabilities explicitly only while capture is enabled (the steps that need them); at every other call,
and on every other layer, attention stays diffusers' SDPA :class:`AttnProcessor2_0`. Captured maps keep the batch
dimension (only the rows the caller names, e.g. the conditional half of a CFG batch) and the autograd graph, so a
loss on them trains the LoRA of ``to_q``/``to_k``.

``capture_all=True`` reproduces the official code's cost model instead: explicit attention on every layer
(self-attention included) at every call while installed, for the profile comparison.

Typical use with :func:`comat.generation.sampling.sample_with_grad`::

    store = AttentionStore(blocks=("mid", "up")).install(unet)
    store.clear()
    with store.capturing_steps({12, 32}, rows=cond_rows(B, guidance)) as hook:
        latents = sample_with_grad(unet, scheduler, embeds, z, grad_steps=..., on_step=hook)
    for step in store.keys():
        attn = store.aggregate(step)        # [B, H, W, 77], heads and layers averaged
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from typing import Callable, Collection, Iterator, Sequence

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import Tensor

from comat.core.errors import ComatError

BLOCKS = {"down": "down_blocks", "mid": "mid_block", "up": "up_blocks"}
Rows = slice | Sequence[int] | Tensor | None
StepHook = Callable[[int, Tensor, bool], None]

__all__ = ["AttentionStore", "CaptureProcessor", "explicit_attention"]


def explicit_attention(
    attn: Attention,
    hidden_states: Tensor,
    encoder_hidden_states: Tensor | None = None,
    attention_mask: Tensor | None = None,
    temb: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """:class:`AttnProcessor2_0`'s computation with the softmax written out: ``(output, probs [B, heads, Nq, Nk])``.

    The scale is ``head_dim ** -0.5`` as in SDPA (which ignores ``attn.scale``), so outputs match the SDPA path
    to float rounding; the softmax runs in float32 so fp16/bf16 maps still sum to 1.
    """
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    input_ndim = hidden_states.ndim
    if input_ndim == 4:
        batch_size, channel, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
    batch_size, sequence_length, _ = (
        hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
    )
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

    query = attn.to_q(hidden_states)
    if encoder_hidden_states is None:
        encoder_hidden_states = hidden_states
    elif attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    key = attn.to_k(encoder_hidden_states)
    value = attn.to_v(encoder_hidden_states)

    head_dim = key.shape[-1] // attn.heads
    query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)

    scores = (query @ key.transpose(-1, -2)).float() * head_dim**-0.5
    if attention_mask is not None:
        scores = scores + attention_mask.float()
    probs = scores.softmax(dim=-1).to(query.dtype)
    hidden_states = (probs @ value).transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
    hidden_states = hidden_states.to(query.dtype)

    hidden_states = attn.to_out[0](hidden_states)
    hidden_states = attn.to_out[1](hidden_states)
    if input_ndim == 4:
        hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
    if attn.residual_connection:
        hidden_states = hidden_states + residual
    return hidden_states / attn.rescale_output_factor, probs


def _in_backward() -> bool:
    # True while autograd runs a backward pass, which is when gradient checkpointing recomputes a forward.
    return torch._C._current_graph_task_id() != -1


class CaptureProcessor(AttnProcessor2_0):
    """SDPA unless its store is capturing (or forces explicit attention); then explicit, and records the map.

    Gradient checkpointing recomputes a block's forward during backward, when capture is long over; that
    recomputation must take the same code path as the original call or autograd rejects it. So every call made
    with autograd on pushes its choice on a per-layer stack, and a call during backward pops and replays the
    latest one (backward visits a layer's calls newest first) without recording anything.
    """

    def __init__(self, store: "AttentionStore", name: str, capture: bool):
        super().__init__()
        self.store = store
        self.name = name
        self.capture = capture
        self.replay: list[bool] = []

    def __call__(
        self,
        attn: Attention,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        *args,
        **kwargs,
    ) -> Tensor:
        store = self.store
        if _in_backward():
            record, explicit = False, self.replay.pop() if self.replay else store.capture_all
        else:
            record = self.capture and store.enabled and store._wanted(hidden_states)
            explicit = record or store.capture_all
            if torch.is_grad_enabled():
                self.replay.append(explicit)
        if not explicit:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        out, probs = explicit_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if record:
            store._record(self.name, probs)
        return out


class AttentionStore:
    """Installs capturing processors on a UNet's cross-attention layers and keeps the maps they record.

    ``blocks``: which of ``"down"``, ``"mid"``, ``"up"`` to capture. ``resolutions``: if given, only layers whose
    attention map height (latent-map pixels, e.g. 8/16/32/64 for SD1.5 at 512) is listed record. Maps are
    stored per key (a sampling step index by default) and layer name (the attention module's path, e.g.
    ``up_blocks.1.attentions.0.transformer_blocks.0.attn2``) as ``[B_kept, heads, H*W, tokens]``.

    Call :meth:`clear` once per training step, before sampling and after the previous backward: the processors
    keep, until then, what a gradient-checkpointed backward needs to recompute the captured calls.
    """

    def __init__(
        self,
        blocks: Collection[str] = ("mid", "up"),
        *,
        resolutions: Collection[int] | None = None,
        capture_all: bool = False,
    ):
        unknown = set(blocks) - set(BLOCKS)
        if unknown:
            raise ComatError(f"unknown UNet block(s) {sorted(unknown)}; choose from {', '.join(BLOCKS)}")
        self.blocks = tuple(blocks)
        self.resolutions = None if resolutions is None else frozenset(int(r) for r in resolutions)
        self.capture_all = capture_all
        self.enabled = False
        self.rows: Rows = None
        self.key: int | str = 0
        self._maps: dict = defaultdict(dict)
        self._sizes: dict[str, tuple[int, int]] = {}
        self._latent_hw: tuple[int, int] | None = None
        self._unet: torch.nn.Module | None = None
        self._originals: dict[str, object] = {}
        self._hook = None
        self._processors: list[CaptureProcessor] = []
        self.layers: list[str] = []

    # -- installation ------------------------------------------------------------------------------

    def _selected(self, name: str, module: Attention) -> bool:
        prefixes = tuple(BLOCKS[b] + "." for b in self.blocks)
        return bool(module.is_cross_attention) and name.startswith(prefixes)

    def install(self, unet: torch.nn.Module) -> "AttentionStore":
        """Put capturing processors on the selected ``attn2`` layers (all layers with ``capture_all``)."""
        if self._unet is not None:
            raise ComatError("this AttentionStore is already installed on a UNet; call remove() first")
        chosen = [
            (name, module, self._selected(name, module))
            for name, module in unet.named_modules()
            if isinstance(module, Attention)
        ]
        if not any(selected for _, _, selected in chosen):
            raise ComatError(
                f"the UNet has no cross-attention layers in blocks {list(self.blocks)} "
                "(install on the unwrapped UNet, before accelerate/DDP wraps it)"
            )
        for name, module, selected in chosen:
            if not (selected or self.capture_all):
                continue
            self._originals[name] = module.get_processor()
            processor = CaptureProcessor(self, name, capture=selected)
            module.set_processor(processor)
            self._processors.append(processor)
            if selected:
                self.layers.append(name)
        # The map of a layer is [H*W, tokens]; its H and W follow from the latent size seen by the UNet.
        self._hook = unet.register_forward_pre_hook(self._see_input, with_kwargs=True)
        self._unet = unet
        return self

    def remove(self) -> None:
        """Restore the processors that were there before :meth:`install` and drop the stored maps."""
        if self._unet is None:
            return
        modules = dict(self._unet.named_modules())
        for name, processor in self._originals.items():
            modules[name].set_processor(processor)
        self._hook.remove()
        self._unet, self._hook, self._originals, self.layers = None, None, {}, []
        self.clear()
        self._processors = []

    def _see_input(self, module, args, kwargs) -> None:
        sample = args[0] if args else kwargs["sample"]
        self._latent_hw = tuple(sample.shape[-2:])

    # -- capture control ---------------------------------------------------------------------------

    def clear(self) -> None:
        """Forget every stored map (call before each training step's sampling, after the previous backward)."""
        self._maps = defaultdict(dict)
        self._sizes = {}
        for processor in self._processors:
            processor.replay.clear()

    @contextlib.contextmanager
    def capture(self, key: int | str = 0, rows: Rows = None) -> Iterator["AttentionStore"]:
        """Record maps under ``key`` while inside, keeping batch ``rows`` (None: all)."""
        saved = self.enabled, self.key, self.rows
        self.enabled, self.key, self.rows = True, key, rows
        try:
            yield self
        finally:
            self.enabled, self.key, self.rows = saved

    @contextlib.contextmanager
    def capturing_steps(self, steps: Collection[int], rows: Rows = None) -> Iterator[StepHook]:
        """Yield an ``on_step`` hook for :func:`comat.generation.sampling.sample_with_grad` that captures at ``steps`` (keyed by
        step index, keeping batch ``rows``); capture is off again when the block ends."""
        steps = frozenset(int(s) for s in steps)

        def hook(i: int, t: Tensor, is_grad: bool) -> None:
            self.enabled = i in steps
            self.key, self.rows = i, rows

        saved = self.enabled, self.key, self.rows
        try:
            yield hook
        finally:
            self.enabled, self.key, self.rows = saved

    # -- recording ---------------------------------------------------------------------------------

    def map_size(self, n: int) -> tuple[int, int]:
        """Height and width of a map with ``n`` query positions, from the last latent size the UNet saw."""
        if self._latent_hw is not None:
            h, w = self._latent_hw
            f = 1
            while f <= max(h, w):
                # each UNet downsampling halves a side, rounding up (stride-2 conv with padding 1)
                hh, ww = math.ceil(h / f), math.ceil(w / f)
                if hh * ww == n:
                    return hh, ww
                f *= 2
        side = math.isqrt(n)
        if side * side != n:
            raise ComatError(f"cannot tell the shape of an attention map with {n} positions; run the UNet on latents")
        return side, side

    def _wanted(self, hidden_states: Tensor) -> bool:
        if self.resolutions is None:
            return True
        n = hidden_states.shape[-2] * hidden_states.shape[-1] if hidden_states.ndim == 4 else hidden_states.shape[1]
        return self.map_size(n)[0] in self.resolutions

    def _record(self, name: str, probs: Tensor) -> None:
        if self.rows is not None:
            probs = probs[self.rows]
        self._sizes[name] = self.map_size(probs.shape[2])
        layer_maps = self._maps[self.key]
        # A layer called twice under one key (cond and uncond in separate UNet calls) stacks along the batch.
        layer_maps[name] = torch.cat([layer_maps[name], probs]) if name in layer_maps else probs

    # -- reading -----------------------------------------------------------------------------------

    def keys(self) -> list:
        """Keys (steps) with stored maps, in recording order."""
        return list(self._maps)

    def maps(self, key: int | str | None = None) -> dict[str, Tensor]:
        """``{layer: [B, heads, H*W, tokens]}`` of ``key`` (default: the only or the last key recorded)."""
        if not self._maps:
            return {}
        if key is None:
            key = self.keys()[-1]
        return dict(self._maps.get(key, {}))

    def by_resolution(self, key: int | str | None = None) -> dict[tuple[int, int], list[Tensor]]:
        """Maps of ``key`` grouped by size: ``{(H, W): [[B, heads, H, W, tokens], ...]}`` (official loss grouping)."""
        groups: dict[tuple[int, int], list[Tensor]] = defaultdict(list)
        for name, m in self.maps(key).items():
            h, w = self._sizes[name]
            groups[(h, w)].append(m.reshape(m.shape[0], m.shape[1], h, w, m.shape[-1]))
        return dict(groups)

    def aggregate(
        self,
        key: int | str | None = None,
        *,
        size: tuple[int, int] | None = None,
        layers: Collection[str] | None = None,
    ) -> Tensor:
        """Mean over heads and layers of ``key``'s maps at a common ``size`` (default: the largest captured).

        Returns ``[B, H, W, tokens]``. Smaller maps are resized bilinearly, a convex combination of pixels, so every
        pixel's map still sums to 1 over tokens.
        """
        maps = {n: m for n, m in self.maps(key).items() if layers is None or n in layers}
        if not maps:
            raise ComatError("no attention maps were captured; enable capture at a step with a UNet call first")
        if size is None:
            size = max((self._sizes[n] for n in maps), key=lambda s: s[0] * s[1])
        out = []
        for name, m in maps.items():
            h, w = self._sizes[name]
            m = m.mean(1).reshape(m.shape[0], h, w, m.shape[-1]).permute(0, 3, 1, 2)  # [B, T, h, w]
            if (h, w) != tuple(size):
                m = F.interpolate(m.float(), size=tuple(size), mode="bilinear", align_corners=False).to(m.dtype)
            out.append(m)
        return torch.stack(out).mean(0).permute(0, 2, 3, 1)
