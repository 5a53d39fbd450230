"""`comat train` on tiny models (32 px, 4 sampler steps, K=2): gradients, switches, resume, NaN, outputs, SDXL, CLI."""

from __future__ import annotations

import csv
import json

import numpy as np
import PIL.Image
import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from typer.testing import CliRunner

import comat.methods.comat.method as comat_method
from comat.cli import app
from comat.core.checkpoint import load_checkpoint
from comat.core.errors import ComatError
from comat.generation.attention import AttentionStore, CaptureProcessor
from comat.methods import Batch
from comat.methods.comat.config import TrainConfig, load_train_config
from comat.train.trainer import Trainer, load_prompts, train
from tests.tiny import run_ranks, save_tiny_blip, save_tiny_grounding_dino, save_tiny_sam

PROMPTS = ["a red square and a blue circle", "a green triangle", "a big yellow cross on the left of a purple circle",
           "a view of the sky"]
WORDS = sorted({w for p in PROMPTS for w in p.split()} | {"photography", "striped", "plain", "dotted", "orange"})


@pytest.fixture(scope="module")
def judges(tmp_path_factory):
    root = tmp_path_factory.mktemp("judges")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    save_tiny_blip(root / "blip", WORDS)
    save_tiny_grounding_dino(root / "gd", WORDS)
    save_tiny_sam(root / "sam")
    return root


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    monkeypatch.setenv("COMAT_CACHE", str(tmp_path / "cache"))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class FakeSegmenter:
    """Entity i of n gets the i-th vertical stripe of the image."""

    def __call__(self, image, nouns):
        h, w = image.shape[-2:]
        masks = torch.zeros(len(nouns), h, w, dtype=torch.bool)
        for i in range(len(nouns)):
            masks[i, :, i * w // len(nouns) : (i + 1) * w // len(nouns)] = True
        return masks


@pytest.fixture
def fake_segmenter(monkeypatch):
    import comat.models.segmenter

    monkeypatch.setattr(comat.models.segmenter, "load_segmenter", lambda *a, **k: FakeSegmenter())


def base_sets(model, judges, ac: bool = True) -> list[str]:
    return [
        f"model={model}", f"prompts={judges / 'prompts.txt'}", "steps=1", "batch=2", "resolution=32", "sample_steps=4",
        "grad_steps=2", "guidance=3.0", "mixed_precision=no", "lr=1e-3", "ckpt_every=1000", "sample_every=1000",
        "lora.rank=4", "lora.alpha=4", "captioner.kind=blip", f"captioner.model={judges / 'blip'}",
        "discriminator.kind=unet-generated", "discriminator.lora_rank=4", "mixed_latent.enabled=false",
        "mixed_latent.data=toy", "mixed_latent.batch=1", f"attribute_concentration.enabled={str(ac).lower()}",
        f"attribute_concentration.detector={judges / 'gd'}", f"attribute_concentration.sam={judges / 'sam'}",
        "attribute_concentration.sam_type=custom", "attribute_concentration.steps=1",
    ]


def config(model, judges, *sets: str, ac: bool = True):
    return load_train_config(None, None, tuple(base_sets(model, judges, ac)) + sets)


def cli_args(*args: str, sets: list[str]) -> list[str]:
    out = ["train", *args]
    for s in sets:
        out += ["--set", s]
    return out


def _batch(prompts, seed=0):
    return Batch(list(prompts), 0, torch.Generator().manual_seed(seed), np.random.default_rng(seed))


def _with_grad(*modules) -> set[int]:
    return {id(p) for m in modules for p in m.parameters() if p.grad is not None}


def _lora(path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "pytorch_lora_weights.safetensors"))


# ------------------------------------------------------------------------------------------- gradients


def test_gradients_reach_exactly_the_trainable_parameters(tiny_sd_dir, judges, tmp_path):
    cfg = config(tiny_sd_dir, judges, "mixed_latent.enabled=true")  # everything on, real tiny GroundingDINO + SAM
    tr = Trainer(cfg, tmp_path / "run", log=lambda m: None)
    m, pipe = tr.method, tr.pipe
    everything = (pipe.unet, pipe.vae, pipe.text_encoder, m.captioner.model, m.discriminator, m.segmenter.detector,
                  m.segmenter.sam)
    gen, disc = tr.updates
    assert (gen.name, disc.name) == ("lora", "discriminator")

    terms = gen.loss(_batch(PROMPTS[::3]))  # the second prompt has no entity: AC skips and counts it
    assert set(terms) == {"i2t", "ac_pos", "ac_neg", "_ac_skipped", "adv", "i2t_mixed"}
    assert float(terms["_ac_skipped"]) == 1.0
    sum(v for k, v in terms.items() if not k.startswith("_")).backward()
    assert _with_grad(*everything) == {id(p) for p in gen.params} == {id(p) for p in m.lora}
    assert any(float(p.grad.abs().sum()) > 0 for p in gen.params)

    for p in gen.params:
        p.grad = None
    sum(disc.loss(_batch(PROMPTS[::3])).values()).backward()
    assert _with_grad(*everything) == {id(p) for p in m.discriminator.trainable_parameters()}
    head = m.discriminator.head.weight
    assert head.grad is not None and float(head.grad.abs().sum()) > 0


# -------------------------------------------------------------------------------------------- switches


def test_no_captioner_means_no_concept_activation(tiny_sd_dir, judges, tmp_path, fake_segmenter, monkeypatch):
    def never(*a, **k):
        raise AssertionError("concept activation ran with captioner.kind=none")

    monkeypatch.setattr(comat_method, "concept_activation_loss", never)
    notes = []
    cfg = config(tiny_sd_dir, judges, "captioner.kind=none", "mixed_latent.enabled=true", "discriminator.kind=dino-image",
                 "discriminator.feature_model=tiny")
    tr = Trainer(cfg, tmp_path / "run", log=notes.append)
    assert tr.method.captioner is None
    row = tr.train_step()
    assert "i2t" not in row and "i2t_mixed" not in row and {"ac_pos", "adv", "d"} <= set(row)
    assert any("tiny DINOv2" in n for n in notes) and any("nothing to score" in n for n in notes)


def test_no_discriminator_and_no_ac_build_nothing(tiny_sd_dir, judges, tmp_path, monkeypatch):
    def never(*a, **k):
        raise AssertionError("attention capture installed with attribute_concentration.enabled=false")

    monkeypatch.setattr(AttentionStore, "install", never)
    tr = Trainer(config(tiny_sd_dir, judges, "discriminator.kind=none", ac=False), tmp_path / "run")
    assert tr.method.discriminator is None and tr.method.store is None and len(tr.updates) == 1
    row = tr.train_step()
    assert set(row) == {"i2t", "loss", "gnorm_lora"}
    assert not any(isinstance(p, CaptureProcessor) for p in tr.pipe.unet.attn_processors.values())


def test_stop_grad_switch_changes_the_lora(tiny_sd_dir, judges, tmp_path):
    loras = []
    for stop in ("true", "false"):
        cfg = config(tiny_sd_dir, judges, f"stop_grad={stop}", "discriminator.kind=unet-real", ac=False)
        tr = Trainer(cfg, tmp_path / stop)
        row = tr.train_step()
        assert {"i2t", "adv", "d"} <= set(row)
        loras.append([p.detach().clone() for p in tr.method.lora])
    assert any(not torch.equal(a, b) for a, b in zip(*loras))


def test_grad_skip_keeps_the_gradient_off_the_first_steps(tiny_sd_dir, judges, tmp_path, monkeypatch):
    seen = []
    sample = comat_method.sample_with_grad
    monkeypatch.setattr(comat_method, "sample_with_grad", lambda *a, **k: seen.append(k["grad_steps"]) or sample(*a, **k))
    for skip in (0, 2):
        cfg = config(tiny_sd_dir, judges, f"grad_skip={skip}", "mixed_latent.enabled=true", ac=False)
        Trainer(cfg, tmp_path / str(skip), log=lambda m: None).method.training_loss(_batch(PROMPTS[:2]))
    (plain, _), (skipped, skipped_mixed) = seen[:2], seen[2:]
    assert len(skipped) == 2 and min(skipped) >= 2 and min(skipped_mixed) >= 2
    assert min(plain) < 2  # 4 steps, K=2: the first grad step is step 0 or 1
    with pytest.raises(ComatError, match="grad_steps=2 must be between 1 and sample_steps - grad_skip = 1"):
        config(tiny_sd_dir, judges, "grad_skip=3")


def test_gradient_accumulation_steps_once_with_the_mean_gradient(tiny_sd_dir, judges, tmp_path):
    cfg = config(tiny_sd_dir, judges, "grad_accum=2", "batch=1", "grad_clip=0", "discriminator.kind=none", ac=False)
    tr = Trainer(cfg, tmp_path / "run")
    lora = tr.method.lora
    per_micro = []
    for micro in range(2):  # by hand: each micro-batch's gradient alone (its draws depend only on seed/step/micro)
        tr.method.training_loss(tr.batch(0, micro))["i2t"].backward()
        per_micro.append([p.grad.clone() for p in lora])
        for p in lora:
            p.grad = None
    assert not all(torch.allclose(a, b, rtol=1e-3, atol=0) for a, b in zip(*per_micro))
    seen = []
    opt = tr.optimizers["lora"]
    step = opt.step
    opt.step = lambda *a, **k: seen.append([p.grad.clone() for p in lora]) or step(*a, **k)
    tr.train_step()
    assert len(seen) == 1
    assert all(torch.allclose(g, (a + b) / 2, rtol=1e-4, atol=0) for g, a, b in zip(seen[0], *per_micro))


RANK_SETS = ("batch=1", "grad_clip=0", "discriminator.kind=none", "seed=1")  # seed 1: the ranks draw other prompts
_RANK_SCRIPT = """
import sys, torch
from pathlib import Path
from safetensors.torch import save_file
from comat.train.trainer import Trainer
from tests.test_train import RANK_SETS, config
torch.set_num_threads(1)
tr = Trainer(config(Path(sys.argv[1]), Path(sys.argv[2]), *RANK_SETS, ac=False), sys.argv[3], log=lambda m: None)
opt, seen = tr.optimizers["lora"], []
step = opt.step
opt.step = lambda *a, **k: seen.append([p.grad.clone() for p in tr.method.lora]) or step(*a, **k)
row = tr.train_step()
grads = {f"g{i}": g.contiguous() for i, g in enumerate(seen[0])}
save_file({**grads, "i2t": torch.tensor(row["i2t"])}, f"{sys.argv[3]}/rank{tr.acc.process_index}.safetensors")
"""


def test_two_processes_draw_apart_and_step_with_the_mean_gradient(tiny_sd_dir, judges, tmp_path, monkeypatch):
    run_ranks(_RANK_SCRIPT, str(tiny_sd_dir), str(judges), str(tmp_path))
    tr = Trainer(config(tiny_sd_dir, judges, *RANK_SETS, ac=False), tmp_path / "one")
    per_rank, i2t = [], []
    for rank in (0, 1):  # by hand, in one process: what each rank's micro-batch alone gives
        monkeypatch.setattr(Accelerator, "process_index", property(lambda self, r=rank: r))
        loss = tr.method.training_loss(tr.batch(0, 0))["i2t"]
        loss.backward()
        per_rank.append([p.grad.clone() for p in tr.method.lora])
        i2t.append(float(loss))
        for p in tr.method.lora:
            p.grad = None
    assert not all(torch.allclose(a, b, rtol=1e-3, atol=0) for a, b in zip(*per_rank))  # the ranks drew apart
    assert i2t[0] != pytest.approx(i2t[1], rel=1e-3)
    mean = [(a + b) / 2 for a, b in zip(*per_rank)]
    for rank in (0, 1):
        seen = load_file(str(tmp_path / f"rank{rank}.safetensors"))
        assert all(torch.allclose(seen[f"g{i}"], g, rtol=1e-4, atol=0) for i, g in enumerate(mean))
        assert float(seen["i2t"]) == pytest.approx(sum(i2t) / 2, rel=1e-5)


def test_ema_steps_once_per_update_and_is_what_the_lora_holds(tiny_sd_dir, judges, tmp_path):
    tr = Trainer(config(tiny_sd_dir, judges, "steps=2", "grad_accum=2", "ema_decay=0.5"), tmp_path / "run",
                 log=lambda m: None)
    lora = tr.updates[0].params
    online = [[p.detach().clone() for p in lora]]
    step = tr.train_step

    def recorded_step():
        row = step()
        online.append([p.detach().clone() for p in lora])
        return row

    tr.train_step = recorded_step
    saved = []
    tr.method.save = lambda path: saved.append([p.detach().clone() for p in lora])
    tr.run()
    # diffusers' EMAModel warms up as min(decay, (1 + n) / (10 + n)) after its n-th update: 0.1, then 2/11.
    shadow = 0.1 * online[0][0] + 0.9 * online[1][0]
    expected = 2 / 11 * shadow + 9 / 11 * online[2][0]
    assert not torch.allclose(online[2][0], online[1][0])
    assert torch.allclose(saved[0][0], expected, atol=1e-6)
    assert all(torch.equal(p, q) for p, q in zip(lora, online[2]))  # training weights are back in place


# ----------------------------------------------------------------------------------- resume and outputs

RESUME_SETS = ("steps=4", "ckpt_every=2", "mixed_latent.enabled=true", "ema_decay=0.5")  # the EMA resumes too


@pytest.fixture(scope="module")
def full_run(tiny_sd_dir, judges, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    import comat.models.segmenter

    mp.setattr(comat.models.segmenter, "load_segmenter", lambda *a, **k: FakeSegmenter())
    mp.setenv("COMAT_CACHE", str(tmp_path_factory.mktemp("cache")))
    out = tmp_path_factory.mktemp("full")
    try:
        train(config(tiny_sd_dir, judges, *RESUME_SETS), out, log=lambda m: None)
    finally:
        mp.undo()
    return out


def test_killed_and_resumed_run_ends_with_the_same_lora(full_run, tiny_sd_dir, judges, tmp_path, fake_segmenter,
                                                        monkeypatch):
    out = tmp_path / "run"
    step = Trainer.train_step

    def dies_in_step_4(self):
        if self.step == 3:  # step 3 is logged but not checkpointed, like a kill between checkpoints
            raise KeyboardInterrupt
        return step(self)

    monkeypatch.setattr(Trainer, "train_step", dies_in_step_4)
    with pytest.raises(KeyboardInterrupt):
        train(config(tiny_sd_dir, judges, *RESUME_SETS), out, log=lambda m: None)
    assert load_checkpoint(out / "checkpoint", modules={})["step"] == 2 and not (out / "lora").exists()
    monkeypatch.setattr(Trainer, "train_step", step)
    import comat.models.fingerprint

    with monkeypatch.context() as patch, pytest.raises(ComatError, match="written with a different model_sha256"):
        patch.setattr(comat.models.fingerprint, "model_fingerprint", lambda model: "retrained")
        train(config(tiny_sd_dir, judges, *RESUME_SETS), out, log=lambda m: None)  # other base weights: no resume
    state_file = out / "checkpoint" / "state.json"
    state = json.loads(state_file.read_text())
    del state["extra"]["resume_key"]["vae_checkpointing"]  # as if written before that field existed, at its default
    state_file.write_text(json.dumps(state))
    notes = []
    train(config(tiny_sd_dir, judges, *RESUME_SETS), out, log=notes.append)
    assert any("resumed" in n and "step 2" in n for n in notes)

    a, b = _lora(full_run / "lora"), _lora(out / "lora")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    da, db = (load_file(str(d / "checkpoint" / "discriminator.safetensors")) for d in (full_run, out))
    assert all(torch.equal(da[k], db[k]) for k in da)
    steps = [int(r["step"]) for r in csv.DictReader((out / "log.csv").open())]
    assert steps == [1, 2, 3, 4]
    assert (out / "config.resolved.yaml").is_file() and (out / "samples" / "step_000004.png").is_file()


def test_final_lora_loads_in_plain_diffusers(full_run, tiny_sd_dir):
    from diffusers import StableDiffusionPipeline

    base = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None)
    x, t, ehs = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)), 500, torch.zeros(1, 77, 32)
    with torch.no_grad():
        before = base.unet(x, t, ehs).sample
        base.load_lora_weights(str(full_run / "lora"))
        after = base.unet(x, t, ehs).sample
    assert not torch.allclose(before, after)
    rows = list(csv.DictReader((full_run / "log.csv").open()))
    assert len(rows) == 4 and {"i2t", "i2t_mixed", "ac_pos", "ac_neg", "ac_skipped", "adv", "d"} <= set(rows[0])


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tiny_sd_dir, judges, tmp_path, monkeypatch):
    calls = []
    real = comat_method.concept_activation_loss

    def nan_on_third(*a, **k):
        calls.append(1)
        loss = real(*a, **k)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(comat_method, "concept_activation_loss", nan_on_third)
    out = tmp_path / "run"
    with pytest.raises(ComatError, match=r"step 3: loss term 'i2t' is nan.*checkpoint \(step 2\)") as e:
        train(config(tiny_sd_dir, judges, "steps=4", "ckpt_every=2", "discriminator.kind=none", ac=False), out,
              log=lambda m: None)
    assert "\n" not in str(e.value)
    assert load_checkpoint(out / "checkpoint", modules={})["step"] == 2 and not (out / "lora").exists()


_NAN_RANK_SCRIPT = """
import sys, torch
from pathlib import Path
import comat.methods.comat.method as comat_method
from comat.core.errors import ComatError
from comat.train.trainer import train
from tests.test_train import RANK_SETS, config
torch.set_num_threads(1)
real = comat_method.concept_activation_loss
nan_here = int(__import__("os").environ["RANK"]) == 1
comat_method.concept_activation_loss = lambda *a, **k: real(*a, **k) * (float("nan") if nan_here else 1.0)
try:
    train(config(Path(sys.argv[1]), Path(sys.argv[2]), *RANK_SETS, "steps=2", ac=False), sys.argv[3], log=lambda m: None)
except ComatError as e:
    print("STOPPED", e)
"""


def test_nan_on_one_rank_stops_every_rank(tiny_sd_dir, judges, tmp_path):
    outs = run_ranks(_NAN_RANK_SCRIPT, str(tiny_sd_dir), str(judges), str(tmp_path / "run"), timeout=120)
    assert "STOPPED step 1: a loss term is not finite on rank 1" in outs[0]
    assert "STOPPED step 1: loss term 'i2t' is nan" in outs[1]


def test_real_latents_are_cached_across_runs(tiny_sd_dir, judges, tmp_path, monkeypatch):
    calls = []
    real = comat_method.generate_real_latents
    monkeypatch.setattr(comat_method, "generate_real_latents", lambda m, p: calls.append(list(p)) or real(m, p))
    cfg = config(tiny_sd_dir, judges, "captioner.kind=none", ac=False)  # the adversarial term alone
    Trainer(cfg, tmp_path / "a").train_step()
    assert calls and len(list((tmp_path / "cache" / "real-latents").glob("*.safetensors"))) == 2
    calls.clear()
    Trainer(cfg, tmp_path / "b").train_step()
    assert calls == []


# ------------------------------------------------------------------------------------ SDXL, CLI, bad input


def test_sdxl_one_step_through_the_cli(tiny_sdxl_dir, tiny_sd_dir, judges, tmp_path, fake_segmenter):
    sets = base_sets(tiny_sdxl_dir, judges) + [f"discriminator.model={tiny_sd_dir}", "mixed_latent.enabled=true",
                                               "attribute_concentration.variant=official"]
    result = CliRunner().invoke(app, cli_args("--out", str(tmp_path / "run"), "--steps", "1", sets=sets))
    assert result.exit_code == 0, result.output
    row = next(csv.DictReader((tmp_path / "run" / "log.csv").open()))
    assert all(np.isfinite(float(row[k])) for k in ("i2t", "ac_pos", "adv", "i2t_mixed", "d"))
    assert (tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_profile_compares_selective_and_all_layer_capture(tiny_sd_dir, judges, tmp_path, fake_segmenter):
    import json

    # AC off in the config (as in the toy preset): the profile turns it on, since capture is what it measures.
    sets = base_sets(tiny_sd_dir, judges, ac=False) + ["discriminator.kind=none"]
    result = CliRunner().invoke(app, cli_args("--profile", "--steps", "2", "--out", str(tmp_path / "prof"), sets=sets))
    assert result.exit_code == 0, result.output
    assert "attribute concentration is on" in result.output
    prof = json.loads((tmp_path / "prof" / "profile.json").read_text())
    sel, full = prof["selective"], prof["capture_all"]
    assert 0 < sel["explicit_layers"] < full["explicit_layers"]
    assert sel["sec_per_step"] > 0 and full["peak_mb"] > 0
    assert "selective" in result.output and "capture_all" in result.output


def test_toy_prompt_sets():
    from comat.toy.prompts import prompts as toy_prompts

    def load(value):
        return load_prompts(TrainConfig(model="toy", prompts=value))

    train_set, open_set = load(None), load("toy-open")
    assert train_set == load("toy") and "a red triangle and a blue square" not in train_set
    assert set(open_set) != set(train_set)
    assert not set(open_set) & set(toy_prompts("color", "eval"))
    chosen = load("toy-open:color,single")
    assert chosen == toy_prompts("color", "open") + toy_prompts("single", "open")
    with pytest.raises(ComatError, match="no toy category 'colour'"):
        load("toy-open:colour")
    with pytest.raises(ComatError, match="prompts=FILE"):
        load_prompts(TrainConfig(model="hub/sd", prompts=None))


def test_bad_input_is_one_line(tiny_sd_dir, judges, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(ComatError, match="holds no prompts"):
        Trainer(config(tiny_sd_dir, judges, f"prompts={empty}"), tmp_path / "a")
    with pytest.raises(ComatError, match="does not exist"):
        Trainer(config(tiny_sd_dir, judges, f"prompts={tmp_path / 'missing.txt'}"), tmp_path / "a")
    for bad in ("discriminator.kind=patchgan", "captioner.kind=clip"):
        with pytest.raises(ComatError, match="does not exist"):
            config(tiny_sd_dir, judges, bad)
    with pytest.raises(ComatError, match=r"sample_every=0 must be a positive integer; set it with --set sample_every=N"):
        config(tiny_sd_dir, judges, "sample_every=0")
    with pytest.raises(ComatError, match="captions.jsonl"):
        comat_method.ImageCaptions("coco", 32, 0)
    coco = tmp_path / "coco"
    coco.mkdir()
    PIL.Image.new("RGB", (48, 32), (255, 0, 0)).save(coco / "a.png")
    (coco / "captions.jsonl").write_text('{"image": "a.png", "caption": "a red image"}\n')
    images, captions = comat_method.ImageCaptions(str(coco), 32, 0).sample(2, np.random.default_rng(0))
    assert images.shape == (2, 3, 32, 32) and captions == ["a red image"] * 2 and float(images[:, 0].min()) > 0.99
    (coco / "captions.jsonl").write_text('{"img": "a.png"}\n')
    with pytest.raises(ComatError, match="'image' and 'caption'"):
        comat_method.ImageCaptions(str(coco), 32, 0)
    with pytest.raises(ComatError, match="nothing to train"):
        Trainer(config(tiny_sd_dir, judges, "captioner.kind=none", "discriminator.kind=none", ac=False), tmp_path / "a")
