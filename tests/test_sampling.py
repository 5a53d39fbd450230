"""Differentiable sampling on tiny SD / SDXL pipelines loaded through load_t2i."""

from __future__ import annotations

import pytest
import torch

from comat.core.errors import ComatError
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
from comat.models.t2i import LoraSpec, add_lora, load_t2i

PROMPTS = ["a red cube", "a blue ball and a green cube"]
SIZE = 32  # pixels; the tiny VAE downsamples by 2 -> 16x16 latents


@pytest.fixture(scope="module")
def sd(tiny_sd_dir):
    return load_t2i(tiny_sd_dir)


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_dir):
    return load_t2i(tiny_sdxl_dir)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _lora_unet(pipe, seed: int = 0):
    """A copy of the pipeline's UNet with a rank-4 LoRA whose B is non-zero (so every LoRA tensor gets gradient)."""
    import copy

    unet = copy.deepcopy(pipe.unet)
    params = add_lora(unet, LoraSpec(rank=4, alpha=4))
    g = _gen(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return unet, params


class UnetCalls:
    """Records, per UNet call, whether autograd was on and whether the sample input carried a graph."""

    def __init__(self, unet):
        self.grad_enabled: list[bool] = []
        self.input_requires_grad: list[bool] = []
        self.handle = unet.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.grad_enabled.append(torch.is_grad_enabled())
        self.input_requires_grad.append(bool(args[0].requires_grad))

    def remove(self):
        self.handle.remove()


# ----------------------------------------------------------------------------------- grad steps


@pytest.mark.parametrize("T,K", [(50, 5), (52, 5), (10, 1), (10, 10), (7, 3), (1000, 7)])
def test_grad_step_indices_spacing_and_phase(T, K):
    g = _gen(0)
    interval = T // K
    high = T - interval * (K - 1) - 1
    starts = set()
    for _ in range(300):
        steps = grad_step_indices(T, K, g)
        assert len(steps) == K
        assert all(b - a == interval for a, b in zip(steps, steps[1:]))
        assert 0 <= steps[0] <= high and steps[-1] < T
        starts.add(steps[0])
    # the phase is uniform over 0..high: both ends are drawn
    assert min(starts) == 0 and max(starts) == high
    if high < 12:
        assert starts == set(range(high + 1))


def test_grad_step_indices_edges():
    assert grad_step_indices(50, 0) == []
    assert grad_step_indices(5, 5) == [0, 1, 2, 3, 4]
    with pytest.raises(ComatError):
        grad_step_indices(4, 5)
    # reproducible from the generator
    assert grad_step_indices(50, 5, _gen(3)) == grad_step_indices(50, 5, _gen(3))


# ----------------------------------------------------------------------------------- equivalence


def _ours(pipe, kind, generator, steps=8, guidance=7.5, prompts=PROMPTS):
    scheduler = make_scheduler(pipe, kind)
    embeds = encode(pipe, prompts, null_embeds(pipe))
    z = initial_latents(pipe, len(prompts), height=SIZE, width=SIZE, generator=generator, scheduler=scheduler)
    with torch.no_grad():
        return sample_with_grad(pipe.unet, scheduler, embeds, z, steps=steps, guidance=guidance, generator=generator)


def _pipeline(pipe, kind, generator, steps=8, guidance=7.5, prompts=PROMPTS, output_type="latent"):
    original = pipe.scheduler
    pipe.scheduler = make_scheduler(pipe, kind)
    try:
        return pipe(
            prompts, height=SIZE, width=SIZE, num_inference_steps=steps, guidance_scale=guidance,
            generator=generator, output_type=output_type,
        ).images
    finally:
        pipe.scheduler = original


@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
def test_matches_diffusers_pipeline(sd, kind):
    ours = _ours(sd, kind, _gen(7))
    ref = _pipeline(sd, kind, _gen(7))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_per_sample_generators_match_pipeline(sd):
    # one generator per sample: a sample's noise does not depend on its batch neighbours
    ours = _ours(sd, "ddpm", [_gen(1), _gen(2)])
    ref = _pipeline(sd, "ddpm", [_gen(1), _gen(2)])
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    alone = _ours(sd, "ddpm", [_gen(2)], prompts=PROMPTS[1:])
    # batch size alone changes float rounding (same size of difference with DDIM), not the noise
    torch.testing.assert_close(ours[1:], alone, atol=5e-3, rtol=0)


def test_no_guidance_matches_pipeline(sd):
    ours = _ours(sd, "ddim", _gen(4), guidance=1.0)
    ref = _pipeline(sd, "ddim", _gen(4), guidance=1.0)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert cond_rows(2, 1.0) == slice(0, 2) and cond_rows(2, 7.5) == slice(2, 4)


def test_sdxl_matches_pipeline(sdxl):
    torch.testing.assert_close(_ours(sdxl, "ddim", _gen(5)), _pipeline(sdxl, "ddim", _gen(5)), atol=1e-5, rtol=1e-5)


def test_decode_matches_pipeline_images(sd):
    latents = _pipeline(sd, "ddim", _gen(9))
    images = _pipeline(sd, "ddim", _gen(9), output_type="pt")
    with torch.no_grad():
        ours = decode(sd.vae, latents)
    assert ours.shape == (2, 3, SIZE, SIZE) and 0 <= ours.min() and ours.max() <= 1
    torch.testing.assert_close(ours, images, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------- gradients


def _run(pipe, unet, *, grad_steps, stop_grad=True, steps=8, seed=0, on_step=None):
    scheduler = make_scheduler(pipe, "ddpm")
    embeds = encode(pipe, PROMPTS, null_embeds(pipe))
    z = initial_latents(pipe, 2, height=SIZE, width=SIZE, generator=_gen(seed), scheduler=scheduler)
    return sample_with_grad(
        unet, scheduler, embeds, z, steps=steps, grad_steps=grad_steps, stop_grad=stop_grad,
        generator=_gen(seed + 1), on_step=on_step,
    )


def _lora_grads(unet, out):
    unet.zero_grad(set_to_none=True)
    out.square().mean().backward()
    return {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}


def test_gradient_reaches_lora_only_through_grad_steps(sd):
    unet, params = _lora_unet(sd)
    calls = UnetCalls(unet)
    hooked: list[tuple[int, bool]] = []
    out = _run(sd, unet, grad_steps=[1, 4, 7], on_step=lambda i, t, g: hooked.append((i, g)))
    calls.remove()
    assert calls.grad_enabled == [i in (1, 4, 7) for i in range(8)]  # exactly K UNet calls build a graph
    assert hooked == [(i, i in (1, 4, 7)) for i in range(8)]
    grads = _lora_grads(unet, out)
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert set(grads) == trainable and all(g.abs().sum() > 0 for g in grads.values())
    assert all("lora_" in n for n in grads)
    assert len(trainable) == len(params)


def test_no_grad_steps_equals_no_grad_loop(sd):
    unet, _ = _lora_unet(sd)
    out = _run(sd, unet, grad_steps=[])
    assert not out.requires_grad and out.grad_fn is None
    with torch.no_grad():
        ref = _run(sd, unet, grad_steps=[2, 5])
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    # the graph changes nothing about the values
    torch.testing.assert_close(_run(sd, unet, grad_steps=[2, 5]).detach(), ref, atol=1e-6, rtol=1e-6)


def test_no_graph_before_first_grad_step(sd):
    unet, _ = _lora_unet(sd)
    calls = UnetCalls(unet)
    _run(sd, unet, grad_steps=[3, 6], stop_grad=False)
    calls.remove()
    # the UNet input carries a graph only at grad steps after the first one
    assert calls.input_requires_grad == [i == 6 for i in range(8)]


def test_stop_grad_switch(sd):
    unet, _ = _lora_unet(sd)
    calls = UnetCalls(unet)
    on = _lora_grads(unet, _run(sd, unet, grad_steps=[2, 6], stop_grad=True))
    assert not any(calls.input_requires_grad)  # detached UNet inputs
    calls.input_requires_grad.clear()
    off = _lora_grads(unet, _run(sd, unet, grad_steps=[2, 6], stop_grad=False))
    assert calls.input_requires_grad == [i == 6 for i in range(8)]
    calls.remove()
    # off adds the path through step 6's UNet Jacobian into step 2's LoRA update
    assert any(not torch.allclose(on[n], off[n], rtol=1e-4, atol=1e-10) for n in on)
    # with a single grad step there is no earlier grad step, so the switch changes nothing
    one_on = _lora_grads(unet, _run(sd, unet, grad_steps=[4], stop_grad=True))
    one_off = _lora_grads(unet, _run(sd, unet, grad_steps=[4], stop_grad=False))
    for n in one_on:
        torch.testing.assert_close(one_on[n], one_off[n], rtol=1e-5, atol=1e-8)


def test_stop_grad_off_gradient_through_earlier_unet(sd):
    """With stop_grad off, d(loss)/d(z_t) at the later grad step flows back through its UNet into earlier steps."""
    unet, _ = _lora_unet(sd)
    scheduler = make_scheduler(sd, "ddim")
    embeds = encode(sd, PROMPTS, null_embeds(sd))
    z0 = initial_latents(sd, 2, height=SIZE, width=SIZE, generator=_gen(0), scheduler=scheduler).requires_grad_(True)

    def grad_wrt_start(stop_grad):
        out = sample_with_grad(unet, scheduler, embeds, z0, steps=6, grad_steps=[0, 3], stop_grad=stop_grad)
        return torch.autograd.grad(out.square().mean(), z0)[0]

    # z0 -> final through the scheduler's linear terms only (stop_grad) vs also through both UNet Jacobians
    linear_only, full = grad_wrt_start(True), grad_wrt_start(False)
    assert not torch.allclose(linear_only, full, rtol=1e-4, atol=1e-10)


def test_sdxl_gradients(sdxl):
    unet, params = _lora_unet(sdxl)
    out = _run(sdxl, unet, grad_steps=[0, 5], steps=8)
    assert out.requires_grad
    images = decode(sdxl.vae, out)
    images.mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def test_decode_checkpointing_same_values_and_grads(sd):
    z = torch.randn(2, 4, 16, 16, generator=_gen(0))
    grads = []
    for ckpt in (False, True):
        zz = z.clone().requires_grad_(True)
        x = decode(sd.vae, zz, checkpointing=ckpt, clamp=False)
        (x * torch.linspace(0, 1, x.numel()).view_as(x)).sum().backward()
        grads.append((x.detach(), zz.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])


def test_encode_images_and_errors(sd):
    images = torch.rand(2, 3, SIZE, SIZE)
    z = encode_images(sd.vae, images, sample=False)
    assert z.shape == (2, 4, 16, 16)
    scheduler = make_scheduler(sd, "ddpm")
    embeds = encode(sd, PROMPTS)
    with pytest.raises(ComatError):
        sample_with_grad(sd.unet, scheduler, embeds, z, steps=5, grad_steps=[5])
    with pytest.raises(ComatError):
        sample_with_grad(sd.unet, scheduler, embeds[:1], z, steps=5)
    with pytest.raises(ComatError):
        make_scheduler(sd, "euler")
    with pytest.raises(ComatError):
        initial_latents(sd, 1, height=33, width=32)


def test_start_index_runs_the_tail(sd):
    """Starting at index s equals the full loop's tail fed with its own z at s (mixed-latent entry point)."""
    scheduler = make_scheduler(sd, "ddim")
    embeds = encode(sd, PROMPTS)
    z = initial_latents(sd, 2, height=SIZE, width=SIZE, generator=_gen(0), scheduler=scheduler)
    ran: list[int] = []
    with torch.no_grad():
        full = sample_with_grad(sd.unet, scheduler, embeds, z, steps=6)
        z3 = z  # z at index 3: the first 3 steps of the same 6-step schedule, by hand
        for t in scheduler.timesteps[:3]:
            eps = sd.unet(torch.cat([z3, z3]), t, **embeds.unet_kwargs(True)).sample
            u, c = eps.chunk(2)
            z3 = scheduler.step(u + 7.5 * (c - u), t, z3).prev_sample
        tail = sample_with_grad(sd.unet, scheduler, embeds, z3, steps=6, start=3, on_step=lambda i, t, g: ran.append(i))
    assert ran == [3, 4, 5]
    torch.testing.assert_close(tail, full, atol=1e-5, rtol=1e-5)


def test_null_embeds_and_prompt_embeds(sd, sdxl):
    neg, pooled = null_embeds(sdxl)  # the pipeline's default: zeros for SDXL
    assert neg.abs().sum() == 0 and pooled.abs().sum() == 0 and neg.shape == (1, 77, 64)
    neg, pooled = null_embeds(sdxl, encode_empty=True)  # the official code's encoded ""
    assert neg.abs().sum() > 0 and pooled.shape == (1, 32)
    assert sdxl.config.force_zeros_for_empty_prompt  # the pipeline is left as it was
    sd_null, none = null_embeds(sd)
    assert none is None and sd_null.shape == (1, 77, 32)
    embeds = encode(sdxl, PROMPTS, (neg, pooled), height=32, width=48)
    assert embeds.time_ids.tolist() == [[32.0, 48.0, 0.0, 0.0, 32.0, 48.0]] * 2
    kwargs = embeds.unet_kwargs(True)
    assert kwargs["encoder_hidden_states"].shape == (4, 77, 64)
    assert kwargs["added_cond_kwargs"]["text_embeds"].shape == (4, 32)
    torch.testing.assert_close(kwargs["added_cond_kwargs"]["text_embeds"][:2], pooled.expand(2, -1))
    one = embeds[1:]
    assert len(one) == 1 and one.pooled.shape == (1, 32)
    assert embeds.to(torch.float64).cond.dtype == torch.float64
