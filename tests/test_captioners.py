"""Captioner log p(text | image): tiny BLIP / GIT / LLaVA saved with save_pretrained and loaded back."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F

from comat.core.errors import ComatError
from comat.models.captioners import Captioner, load_captioner
from comat.models.tokenizer import word_tokenizer

WORDS = ["a", "photography", "of", "red", "blue", "green", "cube", "ball", "and", "on", "the", "big", "small"]
SIZE, PATCH = 32, 8
MEAN, STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
LLAVA_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}{{ '<image>\n' }}{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}{{ ' ASSISTANT:' }}{% endif %}"
)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=SIZE, patch_size=PATCH)


def _save_blip(path):
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    tok = word_tokenizer(WORDS, path / "vocab")
    text = dict(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        encoder_hidden_size=32, max_position_embeddings=64, bos_token_id=tok.convert_tokens_to_ids("[DEC]"),
        pad_token_id=tok.pad_token_id, sep_token_id=tok.sep_token_id, eos_token_id=tok.sep_token_id,
    )
    model = BlipForConditionalGeneration(BlipConfig(vision_config=VISION, text_config=text, projection_dim=32))
    processor = BlipProcessor(BlipImageProcessor(size={"height": SIZE, "width": SIZE}, image_mean=MEAN, image_std=STD), tok)
    model.save_pretrained(path)
    processor.save_pretrained(path)


def _save_git(path):
    from transformers import CLIPImageProcessor, GitConfig, GitForCausalLM, GitProcessor

    tok = word_tokenizer(WORDS, path / "vocab")
    config = GitConfig(
        vision_config=VISION, vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=64, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
        pad_token_id=tok.pad_token_id,
    )
    image_processor = CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}, image_mean=MEAN, image_std=STD)
    GitForCausalLM(config).save_pretrained(path)
    GitProcessor(image_processor, tok).save_pretrained(path)


def _llava_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
    words = specials + sorted(set(WORDS) | {w.capitalize() for w in WORDS} | {"USER", "ASSISTANT", ":", "Describe", "image", "in", "one", "sentence", "."})
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=["<image>"],
    )


def _save_llava(path):
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tok = _llava_tokenizer()
    text = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    n_img = (SIZE // PATCH) ** 2
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**{**VISION, "num_hidden_layers": 2}), text_config=text,
        image_token_index=tok.convert_tokens_to_ids("<image>"), image_seq_length=n_img, vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    image_processor = CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}, image_mean=MEAN, image_std=STD)
    processor = LlavaProcessor(
        image_processor, tok, patch_size=PATCH, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE,
    )
    LlavaForConditionalGeneration(config).save_pretrained(path)
    processor.save_pretrained(path)


BUILDERS = {"blip": _save_blip, "git": _save_git, "llava": _save_llava}


@pytest.fixture(scope="module", params=list(BUILDERS))
def captioner(request, tmp_path_factory) -> Captioner:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp(request.param)
    BUILDERS[request.param](path)
    return load_captioner(request.param, path)


def _images(n=1, size=SIZE, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g)


def _pixels(images):
    return (images - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def _hand_ids(cap, text, prefix):
    """Token ids and number of unscored leading tokens, written out per model (independent of the module)."""
    tok = cap.tokenizer
    if cap.kind in ("blip", "git"):
        ids = tok(prefix + text.lower())["input_ids"]  # [CLS] ... [SEP]
        if cap.kind == "blip":
            ids[0] = cap.model.config.text_config.bos_token_id
        return ids, 1 + len(tok(prefix, add_special_tokens=False)["input_ids"])
    n_img = (SIZE // PATCH) ** 2  # CLIP CLS dropped by the "default" strategy
    context = f"USER: {'<image>' * n_img}\nDescribe the image in one sentence. ASSISTANT: "
    ids = tok(context + prefix + text)["input_ids"] + [tok.eos_token_id]
    return ids, len(tok(context + prefix)["input_ids"])


def _hand_logp(cap, images, text, prefix="a photography of ", eps=0.0):
    ids, n_ctx = _hand_ids(cap, text, prefix)
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        out = cap.model(pixel_values=_pixels(images), input_ids=input_ids)
    logits = out.logits[:, -len(ids) :]  # GIT: drop the leading image positions
    logp = logits[0, :-1].log_softmax(-1)
    targets = input_ids[0, 1:]
    tok = logp.gather(-1, targets[:, None])[:, 0]
    if eps:
        tok = (1 - eps) * tok + eps * logp.mean(-1)
    return tok[n_ctx - 1 :].sum(), len(ids) - n_ctx, input_ids, n_ctx


def test_loaded_frozen(captioner):
    assert captioner.kind in ("blip", "git", "llava")
    assert captioner.image_size == SIZE
    assert not captioner.model.training
    assert all(not p.requires_grad for p in captioner.parameters())
    captioner.train()  # a parent .train() must not switch the judge to training mode
    assert not captioner.model.training
    assert captioner.num_parameters() == sum(p.numel() for p in captioner.model.parameters()) > 0


def test_log_prob_matches_hand_computation(captioner):
    images = _images()
    for text in ["red cube", "Big Blue ball on the green cube"]:
        expected, n, _, _ = _hand_logp(captioner, images, text)
        got = captioner.log_prob(images, [text])
        assert got.shape == (1,)
        torch.testing.assert_close(got[0], expected, rtol=1e-5, atol=1e-5)
        mean = captioner.log_prob(images, [text], reduction="mean")
        torch.testing.assert_close(mean[0], expected / n, rtol=1e-5, atol=1e-5)


def test_matches_model_loss_and_label_smoothing(captioner):
    images = _images(seed=1)
    text = "small red ball"
    _, _, input_ids, n_ctx = _hand_logp(captioner, images, text)
    labels = input_ids.clone()
    labels[:, :n_ctx] = -100
    with torch.no_grad():
        loss = captioner.model(pixel_values=_pixels(images), input_ids=input_ids, labels=labels).loss
    torch.testing.assert_close(captioner.log_prob(images, [text], reduction="mean")[0], -loss, rtol=1e-5, atol=1e-5)

    # label smoothing 0.1 = -torch cross_entropy(label_smoothing=0.1), token mean (the official CoMat value)
    expected_ls, n, _, _ = _hand_logp(captioner, images, text, eps=0.1)
    with torch.no_grad():
        logits = captioner.model(pixel_values=_pixels(images), input_ids=input_ids).logits[:, -input_ids.shape[1] :]
    ce = F.cross_entropy(logits[0, :-1], labels[0, 1:], label_smoothing=0.1)
    got = captioner.log_prob(images, [text], reduction="mean", label_smoothing=0.1)[0]
    torch.testing.assert_close(got, -ce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, expected_ls / n, rtol=1e-5, atol=1e-5)


def test_blip_model_loss_with_hf_label_smoothing(tmp_path):
    """BLIP's own outputs.loss with label_smoothing 0.1 (what the official code minimises) = -log_prob(mean, 0.1)."""
    _save_blip(tmp_path)
    cap = load_captioner("blip", tmp_path)
    cap.model.text_decoder.label_smoothing = 0.1
    images = _images(seed=2)
    _, _, input_ids, n_ctx = _hand_logp(cap, images, "blue cube")
    labels = input_ids.masked_fill(torch.arange(input_ids.shape[1]) < n_ctx, -100)
    with torch.no_grad():
        loss = cap.model(pixel_values=_pixels(images), input_ids=input_ids, labels=labels).loss
    got = cap.log_prob(images, ["blue cube"], reduction="mean", label_smoothing=0.1)[0]
    torch.testing.assert_close(got, -loss, rtol=1e-5, atol=1e-5)


def test_no_prefix_scores_whole_caption(captioner):
    images = _images(seed=3)
    expected, _, _, n_ctx = _hand_logp(captioner, images, "red cube", prefix="")
    torch.testing.assert_close(captioner.log_prob(images, ["red cube"], prefix="")[0], expected, rtol=1e-5, atol=1e-5)
    if captioner.kind != "llava":
        assert n_ctx == 1  # only the start token is unscored


def test_gradient_reaches_pixels(captioner):
    images = _images(2, size=40).requires_grad_(True)  # 40 px: exercises the bicubic resize
    g = torch.Generator().manual_seed(0)
    logp = captioner.log_prob(images, ["red cube", "blue ball"], jitter=2, generator=g)
    assert logp.shape == (2,) and torch.isfinite(logp).all()
    logp.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(p.grad is None for p in captioner.parameters())


def test_resize_and_jitter(captioner):
    images = _images(1, size=48, seed=4)
    resized = F.interpolate(images, size=(SIZE, SIZE), mode="bicubic", align_corners=False, antialias=True)
    torch.testing.assert_close(captioner.preprocess(images), _pixels(resized))
    a = captioner.log_prob(images, ["red cube"], jitter=2, generator=torch.Generator().manual_seed(5))
    b = captioner.log_prob(images, ["red cube"], jitter=2, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b)


def test_padding_and_prefix_masking(captioner):
    images = _images(2, seed=6)
    alone = captioner.log_prob(images[:1], ["red cube"])
    batch = captioner.log_prob(images, ["red cube", "big blue ball on the small green cube"])
    torch.testing.assert_close(batch[0], alone[0], rtol=1e-5, atol=1e-5)
    for reduction in ("sum", "mean"):
        alone = captioner.log_prob(images[1:], ["big blue ball on the small green cube"], reduction=reduction, label_smoothing=0.1)
        batch = captioner.log_prob(images, ["red cube", "big blue ball on the small green cube"], reduction=reduction, label_smoothing=0.1)
        torch.testing.assert_close(batch[1], alone[0], rtol=1e-5, atol=1e-5)


def test_errors(tmp_path):
    with pytest.raises(ComatError, match="unknown captioner kind 'clip'.*blip, git, llava"):
        load_captioner("clip", tmp_path)
    with pytest.raises(ComatError, match="does not exist"):
        load_captioner("blip", tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ComatError, match=r"empty.*lacks config.json, model.safetensors"):
        load_captioner("blip", tmp_path / "empty")


def test_wrong_kind_and_bad_args(tmp_path):
    _save_git(tmp_path)
    with pytest.raises(ComatError, match="'git' model, not blip; pass kind='git'"):
        load_captioner("blip", tmp_path)
    cap = load_captioner("git", tmp_path)
    with pytest.raises(ComatError, match="reduction"):
        cap.log_prob(_images(), ["red cube"], reduction="max")
    with pytest.raises(ComatError, match="2 images but 1 texts"):
        cap.log_prob(_images(2), ["red cube"])
    half = load_captioner("git", tmp_path, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    images = _images(seed=7).requires_grad_(True)
    low = half.log_prob(images, ["red cube"])
    assert low.dtype == torch.float32  # scored in float32 whatever the weights
    low.sum().backward()
    assert images.grad.abs().sum() > 0
    torch.testing.assert_close(low, cap.log_prob(images.detach(), ["red cube"]), rtol=0.05, atol=0.2)
