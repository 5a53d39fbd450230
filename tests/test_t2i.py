import logging

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from comat.core.errors import ComatError
from comat.models.t2i import (
    LoraSpec,
    add_lora,
    check_lora_fits,
    check_prompt_lengths,
    family_of,
    load_t2i,
    lora_rank,
    save_lora,
)

GEN = dict(num_inference_steps=3, height=32, width=32, output_type="pt")


def _sample(pipe, prompt="a red circle and a blue square"):
    return pipe(prompt, generator=torch.Generator().manual_seed(0), **GEN).images


def _trained_lora(pipe, rank=4):
    params = add_lora(pipe.unet, LoraSpec(rank=rank, alpha=rank))
    with torch.no_grad():  # stand-in for training: peft initialises lora_B to zero, i.e. a no-op adapter
        for p in params:
            p.add_(0.5 * torch.randn_like(p))
    return params


def test_loads_both_families(tiny_sd_dir, tiny_sdxl_dir):
    sd, sdxl = load_t2i(tiny_sd_dir), load_t2i(tiny_sdxl_dir)
    assert isinstance(sd, StableDiffusionPipeline) and family_of(sd) == "sd"
    assert isinstance(sdxl, StableDiffusionXLPipeline) and family_of(sdxl) == "sdxl"
    assert _sample(sdxl).shape == (1, 3, 32, 32)


def test_lora_trains_only_adapter_and_plain_diffusers_reloads_it(tiny_sd_dir, tmp_path):
    pipe = load_t2i(tiny_sd_dir)
    base = _sample(pipe)
    params = _trained_lora(pipe)
    trainable = {n for n, p in pipe.unet.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert {id(p) for p in params} == {id(p) for p in pipe.unet.parameters() if p.requires_grad}
    tuned = _sample(pipe)
    assert not torch.allclose(base, tuned, atol=1e-3), "the adapter must change the image"
    save_lora(pipe, tmp_path / "lora")
    assert lora_rank(tmp_path / "lora") == 4

    plain = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, requires_safety_checker=False)
    plain.set_progress_bar_config(disable=True)
    plain.load_lora_weights(tmp_path / "lora")
    torch.testing.assert_close(_sample(plain), tuned, atol=1e-5, rtol=0)
    torch.testing.assert_close(_sample(load_t2i(tiny_sd_dir, lora=tmp_path / "lora")), tuned, atol=1e-5, rtol=0)


def test_lora_for_another_base_or_rank_is_refused(tiny_sd_dir, tiny_sdxl_dir, tmp_path):
    sd = load_t2i(tiny_sd_dir)
    _trained_lora(sd)
    save_lora(sd, tmp_path / "sd-lora")
    with pytest.raises(ComatError, match="another base model"):
        load_t2i(tiny_sdxl_dir, lora=tmp_path / "sd-lora")
    with pytest.raises(ComatError, match="rank 4 but the config asks for rank 8"):
        check_lora_fits(load_t2i(tiny_sd_dir).unet, tmp_path / "sd-lora", expected_rank=8)
    with pytest.raises(ComatError, match="no LoRA at"):
        load_t2i(tiny_sd_dir, lora=tmp_path / "missing")


def test_unknown_lora_targets_are_refused(tiny_sd_dir):
    with pytest.raises(ComatError, match="do not fit this UNet"):
        add_lora(load_t2i(tiny_sd_dir).unet, LoraSpec(rank=2, target_modules=("no_such_proj",)))


def test_bad_model_references(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ComatError, match="does not exist"):
        load_t2i(tmp_path / "nope")
    with pytest.raises(ComatError, match="offline"):
        load_t2i("someone/not-cached-model")
    with pytest.raises(ComatError, match="model_index.json"):
        load_t2i(tmp_path)


def test_long_prompts_are_reported(tiny_sd_dir, caplog):
    pipe = load_t2i(tiny_sd_dir)
    long = "a red circle " * 30
    with caplog.at_level(logging.WARNING):
        assert check_prompt_lengths(pipe, ["a red circle", long]) == [long]
    assert "truncated" in caplog.text
