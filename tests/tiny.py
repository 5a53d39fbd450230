"""Tiny model builders for tests: real architectures from small configs, random weights."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from comat.models.tokenizer import clip_tokenizer


def tiny_text_config(hidden: int = 32, projection: int = 32) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=projection,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )


def tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, sample_size=32,
    )


def tiny_sd_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )
    return StableDiffusionPipeline(
        vae=tiny_vae(), text_encoder=CLIPTextModel(tiny_text_config()), tokenizer=clip_tokenizer(), unet=unet,
        scheduler=DDPMScheduler(num_train_timesteps=1000), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=(2, 4), norm_num_groups=8, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
        transformer_layers_per_block=(1, 2),
    )
    return StableDiffusionXLPipeline(
        vae=tiny_vae(), text_encoder=CLIPTextModel(tiny_text_config()),
        text_encoder_2=CLIPTextModelWithProjection(tiny_text_config(projection=32)),
        tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(), unet=unet,
        scheduler=DDPMScheduler(num_train_timesteps=1000),
    )


# --- judges for training tests (shared with test_captioners / test_segmenter builds) -------------------------------

TINY_SAM = {
    "img_size": 64, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "out_chans": 32, "window_size": 4,
    "global_attn_indexes": [1], "mask_in_chans": 4, "decoder_depth": 1, "decoder_mlp_dim": 64, "decoder_num_heads": 2,
    "iou_head_hidden_dim": 32,
}


def _tiny_blip(path, model_class, words: list[str], size: int, seed: int):
    from transformers import BlipConfig, BlipImageProcessor, BlipProcessor

    from comat.models.tokenizer import word_tokenizer

    torch.manual_seed(seed)
    tok = word_tokenizer(words, path / "vocab")
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=size,
                  patch_size=8)
    text = dict(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        encoder_hidden_size=32, max_position_embeddings=64, bos_token_id=tok.convert_tokens_to_ids("[DEC]"),
        pad_token_id=tok.pad_token_id, sep_token_id=tok.sep_token_id, eos_token_id=tok.sep_token_id,
    )
    model_class(BlipConfig(vision_config=vision, text_config=text, projection_dim=32)).save_pretrained(path)
    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    image_processor = BlipImageProcessor(size={"height": size, "width": size}, image_mean=mean, image_std=std)
    BlipProcessor(image_processor, tok).save_pretrained(path)
    return path


def save_tiny_blip(path, words: list[str], size: int = 32, seed: int = 0):
    """A random BLIP captioner (vocabulary ``words``) saved with its processor, loadable by ``load_captioner``."""
    from transformers import BlipForConditionalGeneration

    return _tiny_blip(path, BlipForConditionalGeneration, words, size, seed)


def save_tiny_grounding_dino(path, words: list[str], seed: int = 0):
    """A random GroundingDINO (64 px, vocabulary ``words``) saved with its processor, loadable by ``load_segmenter``."""
    from transformers import (
        BertConfig,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SwinConfig,
    )

    from comat.toy.recipes_vision import detector_tokenizer

    torch.manual_seed(seed)
    tok = detector_tokenizer(words)  # GroundingDINO splits phrases on BERT's ids of "." and "?"
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(image_size=64, patch_size=2, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                                   window_size=4, out_features=["stage2", "stage3", "stage4"]),
        text_config=BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=64),
        d_model=32, num_queries=8, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_n_points=1, decoder_n_points=1, max_text_len=32,
    )
    GroundingDinoForObjectDetection(config).save_pretrained(path)
    image_processor = GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 64})
    GroundingDinoProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(path)
    return path


def save_tiny_sam(path, seed: int = 0):
    """A random custom SAM (64 px) saved for ``load_sam(path, "custom")``."""
    from comat.models.segmenter import build_custom_sam, save_sam

    torch.manual_seed(seed)
    return save_sam(build_custom_sam(TINY_SAM), path, TINY_SAM)


def save_tiny_vqa(path, words: list[str], size: int = 32, seed: int = 0):
    """A random BLIP-VQA judge (vocabulary ``words`` plus yes/no) saved with its processor, for ``VqaJudge.load``."""
    from transformers import BlipForQuestionAnswering

    return _tiny_blip(path, BlipForQuestionAnswering, sorted(set(words) | {"yes", "no"}), size, seed)


def save_tiny_clip(path, size: int = 32, seed: int = 0):
    """A random CLIPModel with the real CLIP tokenizer and its processor, for ``ClipJudge.load``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(seed)
    vision = dict(image_size=size, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2)
    CLIPModel(CLIPConfig(text_config=tiny_text_config().to_dict(), vision_config=vision, projection_dim=32)).save_pretrained(path)
    image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    CLIPProcessor(image_processor, clip_tokenizer()).save_pretrained(path)
    return path


def run_ranks(script: str, *args: str, world: int = 2, timeout: int = 300) -> list[str]:
    """Run ``python -c script args`` as ``world`` ranks on the CPU, with the environment torchrun gives each rank
    (gloo over localhost); return each rank's stdout once all succeed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "ACCELERATE_USE_CPU": "true"}
        procs.append(subprocess.Popen([sys.executable, "-c", script, *args], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:  # a rank left waiting on the others must not outlive the test
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), outs
    return [o for o, _ in outs]
