"""Cross-attention capture on tiny SD / SDXL UNets (with and without peft LoRA)."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from comat.core.errors import ComatError
from comat.generation.attention import AttentionStore
from comat.models.t2i import LoraSpec, add_lora
from tests.tiny import tiny_sd_pipeline, tiny_sdxl_pipeline

SD_CROSS = {  # every attn2 of the tiny SD UNet (down 16x16, mid 8x8, up 16x16)
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2",
    "mid_block.attentions.0.transformer_blocks.0.attn2",
    "up_blocks.1.attentions.0.transformer_blocks.0.attn2",
    "up_blocks.1.attentions.1.transformer_blocks.0.attn2",
}


@pytest.fixture(scope="module")
def sd_unet():
    return tiny_sd_pipeline().unet


@pytest.fixture()
def lora_unet(sd_unet):
    unet = copy.deepcopy(sd_unet)
    add_lora(unet, LoraSpec(rank=4, alpha=4))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return unet


def _inputs(batch=2, seed=0, hw=(16, 16), dim=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, *hw, generator=g), torch.randn(batch, 77, dim, generator=g)


def _run(unet, x, ehs, **kwargs):
    return unet(x, 500, encoder_hidden_states=ehs, return_dict=False, **kwargs)[0]


def test_disabled_is_sdpa_and_stores_nothing(lora_unet):
    x, ehs = _inputs()
    with torch.no_grad():
        ref = _run(lora_unet, x, ehs)
        store = AttentionStore(blocks=("down", "mid", "up")).install(lora_unet)
        off = _run(lora_unet, x, ehs)
        assert store.keys() == [] and store.maps() == {}
        with store.capture():
            on = _run(lora_unet, x, ehs)
    torch.testing.assert_close(off, ref, atol=0, rtol=0)  # the SDPA code path itself
    torch.testing.assert_close(on, ref, atol=1e-5, rtol=1e-5)  # explicit softmax, same numbers
    assert set(store.maps()) == SD_CROSS
    store.remove()
    assert all(type(p) is AttnProcessor2_0 for p in lora_unet.attn_processors.values())
    with torch.no_grad():
        torch.testing.assert_close(_run(lora_unet, x, ehs), ref, atol=0, rtol=0)


def test_maps_are_softmax_over_tokens_with_batch_dim(sd_unet):
    store = AttentionStore().install(sd_unet)
    x, ehs = _inputs(batch=3)
    with torch.no_grad(), store.capture(key=7):
        _run(sd_unet, x, ehs)
    maps = store.maps(7)
    assert set(maps) == {n for n in SD_CROSS if not n.startswith("down")}  # only attn2 of mid and up
    for name, m in maps.items():
        side = 8 if name.startswith("mid") else 16
        assert m.shape == (3, sd_unet.get_submodule(name).heads, side * side, 77)
        torch.testing.assert_close(m.sum(-1), torch.ones(m.shape[:-1]), atol=1e-5, rtol=0)
    agg = store.aggregate(7)
    assert agg.shape == (3, 16, 16, 77)
    torch.testing.assert_close(agg.sum(-1), torch.ones(3, 16, 16), atol=1e-5, rtol=0)
    # manual aggregation: head mean, mid map upsampled to 16x16, layer mean
    mid = maps["mid_block.attentions.0.transformer_blocks.0.attn2"].mean(1).reshape(3, 8, 8, 77)
    mid = torch.nn.functional.interpolate(mid.permute(0, 3, 1, 2), size=(16, 16), mode="bilinear").permute(0, 2, 3, 1)
    ups = [maps[n].mean(1).reshape(3, 16, 16, 77) for n in sorted(maps) if n.startswith("up")]
    torch.testing.assert_close(agg, torch.stack([mid, *ups]).mean(0), atol=1e-6, rtol=1e-5)
    groups = store.by_resolution(7)
    assert {k: len(v) for k, v in groups.items()} == {(8, 8): 1, (16, 16): 2}
    assert groups[(8, 8)][0].shape[2:] == (8, 8, 77)
    store.remove()


def test_only_selected_blocks_and_resolutions(sd_unet):
    x, ehs = _inputs()
    for blocks, resolutions, expected in [
        (("mid",), None, {"mid_block.attentions.0.transformer_blocks.0.attn2"}),
        (("down", "up"), None, {n for n in SD_CROSS if not n.startswith("mid")}),
        (("mid", "up"), (16,), {n for n in SD_CROSS if n.startswith("up")}),
    ]:
        store = AttentionStore(blocks, resolutions=resolutions).install(sd_unet)
        with torch.no_grad(), store.capture():
            _run(sd_unet, x, ehs)
        assert set(store.maps()) == expected
        store.remove()
    with pytest.raises(ComatError):
        AttentionStore(("middle",))


def test_conditional_rows(sd_unet):
    """Capturing rows B..2B of a [uncond; cond] batch equals capturing a cond-only batch."""
    x, ehs = _inputs(batch=2)
    null = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(5)).expand(2, -1, -1)
    store = AttentionStore().install(sd_unet)
    with torch.no_grad():
        with store.capture(key="cfg", rows=slice(2, 4)):
            _run(sd_unet, torch.cat([x, x]), torch.cat([null, ehs]))
        with store.capture(key="cond"):
            _run(sd_unet, x, ehs)
    cfg, cond = store.maps("cfg"), store.maps("cond")
    for name in cfg:
        assert cfg[name].shape[0] == 2
        torch.testing.assert_close(cfg[name], cond[name], atol=1e-5, rtol=1e-5)
    store.clear()
    assert store.keys() == []
    store.remove()


def test_gradient_through_maps_reaches_lora(lora_unet):
    store = AttentionStore(blocks=("up",)).install(lora_unet)
    x, ehs = _inputs()
    with store.capture():
        _run(lora_unet, x, ehs)
    loss = store.aggregate()[..., 3].square().mean()
    loss.backward()
    named = dict(lora_unet.named_parameters())
    for layer in store.layers:  # q and k of a captured layer shape its map
        for proj in ("to_q", "to_k"):
            grad = named[f"{layer}.{proj}.lora_B.default.weight"].grad
            assert grad is not None and grad.abs().sum() > 0
    # v and out of the last captured layer only shape what comes after the maps
    last = store.layers[-1]
    assert last == "up_blocks.1.attentions.1.transformer_blocks.0.attn2"
    assert named[f"{last}.to_v.lora_B.default.weight"].grad is None
    assert named[f"{last}.to_out.0.lora_B.default.weight"].grad is None
    assert all(p.grad is None for n, p in named.items() if "lora_" not in n)
    store.remove()


def _sample_and_capture(pipe, unet, store, capture_steps, grad_steps=(1, 4)):
    from comat.generation.sampling import cond_rows, encode, initial_latents, make_scheduler, sample_with_grad

    scheduler = make_scheduler(pipe, "ddim")
    embeds = encode(pipe, ["a red cube", "a blue ball"])
    z = initial_latents(pipe, 2, height=32, width=32, generator=torch.Generator().manual_seed(0), scheduler=scheduler)
    store.clear()
    with store.capturing_steps(capture_steps, rows=cond_rows(2, 7.5)) as hook:
        out = sample_with_grad(unet, scheduler, embeds, z, steps=6, grad_steps=grad_steps, on_step=hook)
    return out, scheduler, embeds, z


def test_capture_at_chosen_sampler_steps():
    """Capture only at chosen steps of sample_with_grad, conditional half only; off again afterwards."""
    from comat.generation.sampling import sample_with_grad

    pipe = tiny_sd_pipeline()
    pipe.set_progress_bar_config(disable=True)
    store = AttentionStore().install(pipe.unet)
    out, scheduler, embeds, z = _sample_and_capture(pipe, pipe.unet, store, {4, 5})
    assert store.keys() == [4, 5] and not store.enabled
    assert all(m.shape[0] == 2 and m.requires_grad for m in store.maps(4).values())
    assert not any(m.requires_grad for m in store.maps(5).values())  # step 5 ran without a graph
    with torch.no_grad():
        ref = sample_with_grad(pipe.unet, scheduler, embeds, z, steps=6)
    torch.testing.assert_close(out.detach(), ref, atol=1e-5, rtol=1e-5)
    store.remove()


def test_capture_with_unet_gradient_checkpointing(lora_unet):
    """Checkpointed blocks recompute in backward along the path (explicit or SDPA) their forward took."""
    pipe = tiny_sd_pipeline()
    pipe.set_progress_bar_config(disable=True)
    grads = []
    for checkpointing in (False, True):
        unet = copy.deepcopy(lora_unet)
        if checkpointing:
            unet.enable_gradient_checkpointing()
        store = AttentionStore().install(unet)
        out, *_ = _sample_and_capture(pipe, unet, store, {1})
        loss = out.square().mean() + sum(store.aggregate(k)[..., 2].square().mean() for k in store.keys())
        loss.backward()
        grads.append({n: p.grad for n, p in unet.named_parameters() if p.requires_grad})
        store.remove()
    assert set(grads[0]) == set(grads[1])
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-4)


def test_capture_all_is_explicit_everywhere(sd_unet):
    x, ehs = _inputs()
    with torch.no_grad():
        ref = _run(sd_unet, x, ehs)
    store = AttentionStore(capture_all=True).install(sd_unet)
    processors = sd_unet.attn_processors
    assert all(type(p).__name__ == "CaptureProcessor" for p in processors.values())  # attn1 too
    calls = []
    import comat.generation.attention as attention

    original = attention.explicit_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    attention.explicit_attention = counting
    try:
        with torch.no_grad():
            out = _run(sd_unet, x, ehs)  # capture disabled: explicit anyway, nothing stored
    finally:
        attention.explicit_attention = original
    assert len(calls) == len(processors) == 8 and store.keys() == []
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    with torch.no_grad(), store.capture():
        _run(sd_unet, x, ehs)
    assert set(store.maps()) == {n for n in SD_CROSS if not n.startswith("down")}
    store.remove()
    assert all(type(p) is AttnProcessor2_0 for p in sd_unet.attn_processors.values())


def test_sdxl_multi_layer_transformers_and_non_square():
    unet = tiny_sdxl_pipeline().unet
    add_lora(unet, LoraSpec(rank=4, alpha=4))
    store = AttentionStore(blocks=("mid", "up")).install(unet)
    # transformer_layers_per_block=(1, 2): the 8x8 level has two transformer blocks per attention
    assert "mid_block.attentions.0.transformer_blocks.1.attn2" in store.layers
    assert "up_blocks.0.attentions.0.transformer_blocks.1.attn2" in store.layers
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 24, generator=g)  # non-square latents: 8x12 maps
    added = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.tensor([[32.0, 48, 0, 0, 32, 48]] * 2)}
    with torch.no_grad():
        ref = unet(x, 10, encoder_hidden_states=torch.randn(2, 77, 64, generator=g), added_cond_kwargs=added).sample
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 24, generator=g)
    added = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.tensor([[32.0, 48, 0, 0, 32, 48]] * 2)}
    with store.capture(rows=[1]):
        out = unet(x, 10, encoder_hidden_states=torch.randn(2, 77, 64, generator=g), added_cond_kwargs=added).sample
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    agg = store.aggregate()
    assert agg.shape == (1, 8, 12, 77)
    torch.testing.assert_close(agg.sum(-1), torch.ones(1, 8, 12), atol=1e-5, rtol=0)
    agg[..., 2].sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in unet.named_parameters() if "lora_B" in n)
    store.remove()


def test_install_errors(sd_unet):
    store = AttentionStore().install(sd_unet)
    with pytest.raises(ComatError):
        store.install(sd_unet)
    with pytest.raises(ComatError):
        store.aggregate()
    store.remove()
    store.remove()  # idempotent
