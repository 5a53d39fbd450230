"""CoMat loss terms: hand-computed attribute concentration, captioner loss, discriminators on tiny models."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from comat.core.errors import ComatError
from comat.methods.comat.losses import (
    ImageFeatureDiscriminator,
    LatentDiscriminator,
    attribute_concentration_loss,
    concept_activation_loss,
    discriminator_loss,
    generator_adversarial_loss,
    resize_masks,
)
from comat.models.t2i import LoraSpec, add_lora

ALPHA, BETA = 1e-3, 5e-5
log = math.log

# A 2x2 cross-attention map over 3 tokens (each pixel sums to 1), pixels in order (0,0) (0,1) (1,0) (1,1):
#   (0,0): 0.6 0.2 0.2    (0,1): 0.2 0.6 0.2
#   (1,0): 0.4 0.4 0.2    (1,1): 0.2 0.2 0.6
# token sums S_0 = 1.4, S_1 = 1.4, S_2 = 1.2
A = torch.tensor([[[0.6, 0.2, 0.2], [0.2, 0.6, 0.2]], [[0.4, 0.4, 0.2], [0.2, 0.2, 0.6]]], dtype=torch.float64)


def _mask(*pixels, size=2):
    m = torch.zeros(size, size, dtype=torch.bool)
    for p in pixels:
        m[p] = True
    return m


# entity 1: token 1, inside (0,1) -- given at 4x4 (its top-right 2x2 block) to exercise the nearest resize
MASK1_4x4 = torch.zeros(4, 4, dtype=torch.bool)
MASK1_4x4[:2, 2:] = True
# entity 2: tokens 0 and 2, inside the left column (0,0), (1,0)
MASK2 = _mask((0, 0), (1, 0))

# entity 1 alone
POS1 = ALPHA * 0.6 / 1.4 + BETA * log(0.6) / 4
NEG1 = ALPHA * -(0.2 + 0.4 + 0.2) / 1.4 + BETA * (log(1 - 0.2) + log(1 - 0.4) + log(1 - 0.2)) / 4
# entity 2: sum_k A_k/S_k = A_0/1.4 + A_2/1.2 and sum_k A_k = A_0 + A_2 = 0.8, 0.4, 0.6, 0.8
POS2 = ALPHA * ((0.6 / 1.4 + 0.2 / 1.2) + (0.4 / 1.4 + 0.2 / 1.2)) + BETA * (log(0.8) + log(0.6)) / 4
NEG2 = ALPHA * (-(0.2 / 1.4 + 0.2 / 1.2) - (0.2 / 1.4 + 0.6 / 1.2)) + BETA * (log(1 - 0.4) + log(1 - 0.8)) / 4


def _close(value, expected):
    assert float(value) == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_paper_one_entity_hand_computed():
    pos, neg = attribute_concentration_loss(A[None], [[MASK1_4x4]], [[(1,)]], alpha=ALPHA, beta=BETA)
    _close(pos, -POS1)
    _close(neg, -NEG1)


def test_paper_two_entities_hand_computed():
    pos, neg = attribute_concentration_loss(A[None], [[MASK1_4x4, MASK2]], [[(1,), (0, 2)]], alpha=ALPHA, beta=BETA)
    _close(pos, -(POS1 + POS2) / 2)  # N = 2
    _close(neg, -(NEG1 + NEG2) / 2)


def test_batch_mean_and_entityless_sample():
    attn = torch.stack([A, A, A])
    masks = [[MASK1_4x4], [MASK1_4x4, MASK2], []]
    pos, neg = attribute_concentration_loss(attn, masks, [[(1,)], [(1,), (0, 2)], []])
    # the third sample has no entity: it adds 0 but counts in the batch size
    _close(pos, (-POS1 - (POS1 + POS2) / 2) / 3)
    _close(neg, (-NEG1 - (NEG1 + NEG2) / 2) / 3)


def test_absent_entity_only_negative_term():
    empty = torch.zeros(2, 2, dtype=torch.bool)
    pos, neg = attribute_concentration_loss(A[None], [[empty]], [[(1,)]])
    assert float(pos) == 0.0
    _close(neg, -(ALPHA * -(1.4 / 1.4) + BETA * (log(0.8) + log(0.4) + log(0.6) + log(0.8)) / 4))
    # an entity without token positions is ignored
    pos2, neg2 = attribute_concentration_loss(A[None], [[empty, MASK2]], [[(1,), ()]])
    _close(pos2, 0.0)
    _close(neg2, float(neg))


def test_heads_and_layers_are_averaged_in_paper_variant():
    # two heads whose mean is A, passed as [B, heads, H, W, T] and as two layers
    h1 = 0.5 * A + 0.5 / 3  # halfway to uniform
    h2 = 2 * A - h1
    assert (h2 >= 0).all()
    heads = torch.stack([h1, h2])[None]
    ref = attribute_concentration_loss(A[None], [[MASK2]], [[(0, 2)]])
    for attn in (heads, [h1[None], h2[None]]):
        got = attribute_concentration_loss(attn, [[MASK2]], [[(0, 2)]])
        _close(got[0], float(ref[0]))
        _close(got[1], float(ref[1]))


def test_official_variant_hand_computed():
    # head 2's token-1 column is 0.2 0.2 0.2 0.6 (S = 1.2); head 1 is A (token 1: 0.2 0.6 0.4 0.2, S = 1.4)
    head2 = torch.tensor([[[0.6, 0.2, 0.2], [0.6, 0.2, 0.2]], [[0.6, 0.2, 0.2], [0.2, 0.6, 0.2]]], dtype=torch.float64)
    attn = torch.stack([A, head2])[None]  # [1, heads, 2, 2, 3]
    mask = _mask((0, 1))
    token, pixel = attribute_concentration_loss(attn, [[mask]], [[(1,)]], variant="official")
    inside = (0.6 / 1.4 + 0.2 / 1.2) / 2  # mean over heads of the inside fraction
    _close(token, ALPHA * (1 - inside) ** 2)
    # head-mean of token 1: 0.2 0.4 0.3 0.4; BCE against 0 1 0 0
    _close(pixel, BETA * -(log(1 - 0.2) + log(0.4) + log(1 - 0.3) + log(1 - 0.4)) / 4)
    # two layers: token terms add up over layers, the pixel term uses the layer mean
    token2, pixel2 = attribute_concentration_loss([attn, attn], [[mask]], [[(1,)]], variant="official")
    _close(token2, 2 * float(token))
    _close(pixel2, float(pixel))


def test_official_absent_entity_and_multi_token():
    empty = torch.zeros(2, 2, dtype=torch.bool)
    token, pixel = attribute_concentration_loss(A[None], [[empty, MASK2]], [[(1,), (0, 2)]], variant="official")
    # absent: inside fraction 0 -> (1 - 0)^2 = 1; BCE of token 1 against all-zero
    absent_pixel = -(log(0.8) + log(0.4) + log(0.6) + log(0.8)) / 4
    # entity 2: mean over its tokens of (1 - inside)^2 with inside_0 = 1.0/1.4, inside_2 = 0.4/1.2
    e2_token = ((1 - 1.0 / 1.4) ** 2 + (1 - 0.4 / 1.2) ** 2) / 2
    e2_pixel = -(log(0.8) + log(1 - 0.4) + log(0.6) + log(1 - 0.8)) / 4
    _close(token, ALPHA * (1 + e2_token) / 2)
    _close(pixel, BETA * (absent_pixel + e2_pixel) / 2)


def test_mask_resizing():
    nearest = resize_masks([MASK1_4x4], (2, 2))
    assert nearest.tolist() == [[[0.0, 1.0], [0.0, 0.0]]]
    dot = torch.zeros(8, 8, dtype=torch.bool)
    dot[1, 7] = True
    official = resize_masks([dot], (2, 2), mode="official")
    assert official[0, 0, 1] == 1  # any coverage counts in the official resize
    block = resize_masks([MASK1_4x4], (2, 2), mode="official")
    assert (block >= nearest).all()
    with pytest.raises(ComatError):
        resize_masks([torch.zeros(1, 4, 4, dtype=torch.bool)], (2, 2))


def test_gradients_reach_the_attention_logits():
    logits = torch.randn(2, 4, 4, 5, dtype=torch.float64, requires_grad=True)
    attn = logits.softmax(-1)
    masks = [[_mask((0, 0), (1, 1), size=4)], [_mask((2, 2), size=4), torch.zeros(4, 4, dtype=torch.bool)]]
    indices = [[(1, 2)], [(3,), (4,)]]
    for variant in ("paper", "official"):
        logits.grad = None
        a, b = attribute_concentration_loss(attn, masks, indices, variant=variant)
        (a + b).backward(retain_graph=True)
        assert logits.grad is not None and logits.grad.abs().sum() > 0
        assert torch.isfinite(logits.grad).all()


def test_errors():
    with pytest.raises(ComatError):
        attribute_concentration_loss(A[None], [[MASK2]], [[(0,)]], variant="nope")
    with pytest.raises(ComatError):
        attribute_concentration_loss(A[None], [[MASK2], [MASK2]], [[(0,)], [(0,)]])
    with pytest.raises(ComatError):
        attribute_concentration_loss(A[None], [[MASK2]], [[(3,)]])
    with pytest.raises(ComatError):
        attribute_concentration_loss(A, [[MASK2]], [[(0,)]])


# ------------------------------------------------------------------------------- concept activation


class StubCaptioner:
    def log_prob(self, images, texts, **options):
        self.options = options
        return -images.mean((1, 2, 3)) * torch.arange(1, len(texts) + 1, dtype=images.dtype)


def test_concept_activation_is_mean_negative_log_prob():
    cap = StubCaptioner()
    images = torch.rand(3, 3, 8, 8, requires_grad=True)
    loss = concept_activation_loss(cap, images, ["a", "b", "c"], prefix="", reduction="mean", label_smoothing=0.1)
    expected = (images.mean((1, 2, 3)) * torch.tensor([1.0, 2.0, 3.0])).mean()
    torch.testing.assert_close(loss, expected)
    assert cap.options == {"prefix": "", "reduction": "mean", "label_smoothing": 0.1}


def test_concept_activation_with_tiny_blip(tmp_path):
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    from comat.models.captioners import BlipCaptioner
    from comat.models.tokenizer import word_tokenizer

    torch.manual_seed(0)
    tok = word_tokenizer(["a", "photography", "of", "red", "blue", "cube", "ball"], tmp_path / "vocab")
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8
    )
    text = dict(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        encoder_hidden_size=32, max_position_embeddings=64, bos_token_id=tok.convert_tokens_to_ids("[DEC]"),
        pad_token_id=tok.pad_token_id, sep_token_id=tok.sep_token_id, eos_token_id=tok.sep_token_id,
    )
    model = BlipForConditionalGeneration(BlipConfig(vision_config=vision, text_config=text, projection_dim=32))
    processor = BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tok)
    cap = BlipCaptioner(model, processor, image_size=32, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    images = torch.rand(2, 3, 48, 48, requires_grad=True)
    prompts = ["a red cube", "a blue ball"]
    loss = concept_activation_loss(cap, images, prompts)
    torch.testing.assert_close(loss, -cap.log_prob(images, prompts).mean())
    assert loss > 0
    loss.backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(p.grad is None for p in cap.parameters())


# ------------------------------------------------------------------------------------ discriminators


@pytest.fixture(scope="module")
def sd_unet():
    from tests.tiny import tiny_sd_pipeline

    return tiny_sd_pipeline().unet


@pytest.fixture()
def latent_d(sd_unet):
    null = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    d = LatentDiscriminator(sd_unet, null, timestep=1, lora=LoraSpec(rank=4, alpha=4))
    with torch.no_grad():  # non-zero B so every LoRA tensor gets gradient
        for name, p in d.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return d


def _generator_output(shape, seed=0):
    w = torch.nn.Parameter(torch.tensor(1.3))
    base = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return w, w * base


def test_latent_discriminator_shape_and_copy(sd_unet, latent_d):
    assert not getattr(sd_unet, "peft_config", None)  # the caller's UNet is untouched
    assert latent_d(torch.randn(3, 4, 16, 16)).shape == (3, 16, 16)
    trainable = {id(p) for p in latent_d.trainable_parameters()}
    assert trainable == {id(p) for p in latent_d.parameters() if p.requires_grad}
    assert all(p.requires_grad is False for n, p in latent_d.unet.named_parameters() if "lora_" not in n)


def test_generator_step_freezes_d_but_passes_gradient(latent_d):
    w, fake = _generator_output((2, 4, 16, 16))
    loss = generator_adversarial_loss(latent_d, fake)
    loss.backward()
    assert w.grad is not None and w.grad.abs() > 0
    assert all(p.grad is None for p in latent_d.parameters())
    assert all(p.requires_grad for p in latent_d.trainable_parameters())  # restored after the step
    with torch.no_grad():
        logits = latent_d(fake)
    _close(loss, float(-F.logsigmoid(logits).mean()))


def test_discriminator_step_trains_only_lora_and_head(latent_d):
    w, fake = _generator_output((2, 4, 16, 16))
    real = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    loss = discriminator_loss(latent_d, fake, real)
    loss.backward()
    assert w.grad is None  # fake is detached
    trainable = {id(p) for p in latent_d.trainable_parameters()}
    for name, p in latent_d.named_parameters():
        if id(p) in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    with torch.no_grad():
        lf, lr = latent_d(fake), latent_d(real)
    expected = -(torch.log1p(-torch.sigmoid(lf)).sum() + F.logsigmoid(lr).sum()) / (lf.numel() + lr.numel())
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


def test_latent_discriminator_rejects_lora_and_sdxl_unets(sd_unet):
    import copy

    from tests.tiny import tiny_sdxl_pipeline

    lora = copy.deepcopy(sd_unet)
    add_lora(lora, LoraSpec(rank=2, alpha=2))
    with pytest.raises(ComatError):
        LatentDiscriminator(lora, torch.zeros(1, 77, 32), timestep=1, lora=LoraSpec(rank=2, alpha=2))
    with pytest.raises(ComatError):
        LatentDiscriminator(tiny_sdxl_pipeline().unet, torch.zeros(1, 77, 64), timestep=1)


def test_image_feature_discriminator_with_tiny_dinov2():
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    net = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2,
                                   image_size=32, patch_size=8))
    d = ImageFeatureDiscriminator(net, image_size=32)
    d.train()
    assert not d.feature_net.training
    w, fake = _generator_output((2, 3, 48, 48))
    fake = fake.sigmoid()
    assert d(fake).shape == (2, 17)  # 16 patches + CLS, one logit each
    generator_adversarial_loss(d, fake).backward()
    assert w.grad is not None and w.grad.abs() > 0 and all(p.grad is None for p in d.parameters())
    real = torch.rand(2, 3, 48, 48)
    w.grad = None
    discriminator_loss(d, fake, real).backward()
    assert w.grad is None
    assert all(p.grad is not None for p in d.head.parameters())
    assert all(p.grad is None for p in d.feature_net.parameters())


def test_half_precision_maps_are_scored_in_float32():
    pos, neg = attribute_concentration_loss(A[None].half(), [[MASK1_4x4]], [[(1,)]])
    assert pos.dtype == torch.float32
    assert float(pos) == pytest.approx(-POS1, rel=1e-3)
    assert float(neg) == pytest.approx(-NEG1, rel=1e-3)


def test_latent_discriminator_uses_sdpa_even_from_a_capturing_unet(sd_unet):
    from diffusers.models.attention_processor import AttnProcessor2_0

    from comat.generation.attention import AttentionStore

    store = AttentionStore(capture_all=True).install(sd_unet)
    try:
        d = LatentDiscriminator(sd_unet, torch.zeros(1, 77, 32), timestep=1, lora=LoraSpec(rank=2, alpha=2))
    finally:
        store.remove()
    assert all(type(p) is AttnProcessor2_0 for p in d.unet.attn_processors.values())
