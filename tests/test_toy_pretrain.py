import time

import numpy as np
import pytest
import torch

from comat.core.errors import ComatError
from comat.toy.pretrain import PretrainConfig, parallel_wall_seconds, pretrain_zoo, train_recipe
from comat.toy.prompts import prompt_specs
from comat.toy.recipes import corrupt
from comat.toy.world import sample_batch


class LinearRecipe:
    """A tiny regression on rendered scenes: enough to test the loop's resume and EMA logic."""

    name, requires, steps, lr, ema = "lin", (), 12, 1e-2, 0.9

    def build(self, zoo):
        return {"lin": torch.nn.Linear(3, 1)}

    def loss(self, modules, rng):
        images, _, _ = sample_batch(4, rng)
        x = images.mean(dim=(2, 3)) + 0.01 * torch.randn(4, 3)  # torch RNG too, so both RNG states matter
        return (modules["lin"](x) - 1).pow(2).mean(), {}

    def export(self, modules, zoo):
        (zoo / self.name).mkdir(parents=True)
        torch.save(modules["lin"].state_dict(), zoo / "lin.pt")


def test_paused_and_resumed_run_equals_uninterrupted(tmp_path):
    train_recipe(LinearRecipe(), PretrainConfig(), zoo=tmp_path / "a", work=tmp_path / "wa")
    assert not train_recipe(LinearRecipe(), PretrainConfig(pause_at_step=5), zoo=tmp_path / "b", work=tmp_path / "wb")
    assert not (tmp_path / "b" / "lin").exists()
    assert train_recipe(LinearRecipe(), PretrainConfig(), zoo=tmp_path / "b", work=tmp_path / "wb")
    a = torch.load(tmp_path / "a" / "lin.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "lin.pt", weights_only=True)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert (tmp_path / "wb" / "lin" / "log.csv").read_text().count("\n") >= 1


def test_missing_dependency_is_named(tmp_path):
    recipe = LinearRecipe()
    recipe.requires = ("clip",)
    with pytest.raises(ComatError, match="needs clip first"):
        train_recipe(recipe, PretrainConfig(), zoo=tmp_path, work=tmp_path / "w")


def test_hard_negatives_change_the_binding_not_the_words():
    rng = np.random.default_rng(0)
    for spec in prompt_specs("color", "train")[:50]:
        negative = corrupt(spec, rng)
        assert negative.text != spec.text
        assert sorted(negative.text.split()) == sorted(spec.text.split())  # a swap: same words, other binding


class RestartingRecipe(LinearRecipe):
    """Stages from steps 6 and 9 that each start from the (EMA) weights an export at that step ships."""

    restart_steps = (6, 9)

    def load_export(self, modules, zoo):
        modules["lin"].load_state_dict(torch.load(zoo / "lin.pt", weights_only=True))

    def export(self, modules, zoo):
        (zoo / self.name).mkdir(parents=True, exist_ok=True)
        torch.save(modules["lin"].state_dict(), zoo / "lin.pt")


@pytest.mark.parametrize("shipped_steps", [6, 9])
def test_a_later_stage_continues_from_the_export_alone(tmp_path, shipped_steps):
    import shutil

    train_recipe(RestartingRecipe(), PretrainConfig(), zoo=tmp_path / "a", work=tmp_path / "wa")
    shipped = RestartingRecipe()
    shipped.steps = shipped_steps  # the model as exported before the later stages existed
    train_recipe(shipped, PretrainConfig(), zoo=tmp_path / "b", work=tmp_path / "wb")
    shutil.rmtree(tmp_path / "wb")  # its training checkpoints are gone (another machine)
    assert train_recipe(RestartingRecipe(), PretrainConfig(), zoo=tmp_path / "b", work=tmp_path / "wb2")
    a = torch.load(tmp_path / "a" / "lin.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "lin.pt", weights_only=True)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    from comat.toy.pretrain import read_training_record

    record = read_training_record(tmp_path / "b", "lin")
    assert record["steps"] == 12 and record["continued_from"]["steps"] == shipped_steps


class PhasedRecipe(LinearRecipe):
    """The bias trains for the first phase only; the learning rate halves in the second."""

    ema = 0.0

    def at_step(self, step, modules, opt):
        modules["lin"].bias.requires_grad_(step < 6)
        for group in opt.param_groups:
            group["lr"] = self.lr if step < 6 else self.lr / 2


def test_recipe_phases_hold_across_a_resume(tmp_path):
    train_recipe(PhasedRecipe(), PretrainConfig(), zoo=tmp_path / "a", work=tmp_path / "wa")
    assert not train_recipe(PhasedRecipe(), PretrainConfig(pause_at_step=6), zoo=tmp_path / "b", work=tmp_path / "wb")
    from safetensors.torch import load_file

    bias_at_6 = load_file(tmp_path / "wb" / "lin" / "last" / "lin.safetensors")["bias"]
    assert train_recipe(PhasedRecipe(), PretrainConfig(), zoo=tmp_path / "b", work=tmp_path / "wb")
    a = torch.load(tmp_path / "a" / "lin.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "lin.pt", weights_only=True)
    torch.testing.assert_close(b["bias"], bias_at_6, rtol=0, atol=0)  # frozen in the second phase
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_unet_learning_rate_decays_linearly_after_the_constant_phase_then_later_stages_add_texture_and_object_weight():
    from comat.toy.recipes import UnetRecipe

    recipe = UnetRecipe()
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=recipe.lr)
    middle, second = (recipe.constant_steps + recipe.decay_steps) // 2, recipe.restart_steps[1]
    first_mix, second_mix = recipe.first_categories, recipe.second_categories
    assert second_mix.count("texture") == first_mix.count("texture") + 2
    for step, lr, ema, mix in ((0, recipe.lr, 0.995, first_mix), (recipe.constant_steps - 1, recipe.lr, 0.995, first_mix),
                               (middle, recipe.lr * (1 - (1 - recipe.final_lr_fraction) / 2), recipe.decay_ema, first_mix),
                               (recipe.decay_steps - 1, recipe.lr * (recipe.final_lr_fraction + 0.95 / (recipe.decay_steps - recipe.constant_steps)), recipe.decay_ema, first_mix),
                               (second - 1, recipe.lr * recipe.final_lr_fraction, recipe.decay_ema, first_mix),
                               (second, recipe.second_lr, recipe.decay_ema, second_mix),
                               (recipe.steps - 1, recipe.second_lr, recipe.decay_ema, second_mix)):
        recipe.at_step(step, {}, opt)
        assert opt.param_groups[0]["lr"] == pytest.approx(lr) and recipe.ema == ema and recipe.categories == mix
        assert recipe.object_weight == (recipe.third_object_weight if step >= recipe.restart_steps[2] else 0)
    assert second < recipe.restart_steps[2] < recipe.steps and recipe.third_object_weight > 0


def test_unet_second_stage_starts_from_the_shipped_export():
    from diffusers import UNet2DConditionModel

    from comat.models.hub import TOY_ZOO
    from comat.toy.recipes import UnetRecipe

    recipe = UnetRecipe()
    modules = recipe.build(TOY_ZOO)  # freshly initialised
    shipped = UNet2DConditionModel.from_pretrained(TOY_ZOO / "t2i" / "unet", dtype=torch.float32).state_dict()
    assert not torch.equal(modules["unet"].state_dict()["conv_in.weight"], shipped["conv_in.weight"])
    recipe.load_export(modules, TOY_ZOO)
    for k, v in modules["unet"].state_dict().items():
        torch.testing.assert_close(v, shipped[k], rtol=0, atol=0)


def test_min_snr_weights_match_the_formula():
    from diffusers import DDPMScheduler

    from comat.toy.recipes import min_snr_weights

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")  # epsilon prediction
    t = torch.tensor([0, 300, 999])
    alpha_bar = scheduler.alphas_cumprod[t].double()
    snr = alpha_bar / (1 - alpha_bar)
    assert snr[0] > 5 > snr[2]
    expected = [5 / snr[0], min(snr[1], 5) / snr[1], 1.0]
    torch.testing.assert_close(min_snr_weights(scheduler, t, 5.0).double(), torch.tensor(expected, dtype=torch.float64))


def test_min_snr_weights_of_v_prediction_keep_the_zero_snr_step():
    from comat.toy.recipes import min_snr_weights, toy_scheduler

    scheduler = toy_scheduler()
    t = torch.tensor([0, 300, 999])
    alpha_bar = scheduler.alphas_cumprod[t].double()
    snr = alpha_bar / (1 - alpha_bar)
    assert snr[2] < 1e-6  # zero terminal SNR, up to diffusers' 2**-24 floor
    expected = [6 / (snr[0] + 1), (min(snr[1], 5) + 1) / (snr[1] + 1), 1.0]
    torch.testing.assert_close(min_snr_weights(scheduler, t, 5.0).double(), torch.tensor(expected, dtype=torch.float64))


def test_unet_learns_v_on_the_zero_terminal_snr_schedule(monkeypatch):
    from comat.toy import recipes

    recipe = recipes.UnetRecipe()
    assert recipe.scheduler.config.prediction_type == "v_prediction"
    assert recipe.scheduler.config.timestep_spacing == "trailing" and recipe.scheduler.config.rescale_betas_zero_snr

    # A UNet that returns the exact velocity has zero loss; one that returns the noise does not.
    from types import SimpleNamespace as NS

    latents, noise = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    recipe.batch, recipe.prompt_dropout = 2, 0.0
    recipe.vae = NS(config=NS(scaling_factor=1.0), encode=lambda x: NS(latent_dist=NS(sample=lambda: latents)))
    recipe.text_encoder = lambda ids: NS(last_hidden_state=torch.zeros(2, 77, 8))
    monkeypatch.setattr(recipes, "sample_batch", lambda n, rng, categories: (torch.zeros(n, 3, 64, 64), ["a"] * n, None))
    monkeypatch.setattr(torch, "randn_like", lambda x: noise)

    def loss_of(predict):
        return recipe.loss({"unet": lambda x, t, context: NS(sample=predict(t))}, np.random.default_rng(0))[0].item()

    assert loss_of(lambda t: recipe.scheduler.get_velocity(latents, noise, t)) == 0
    assert loss_of(lambda t: noise) > 0.01


def test_unet_third_stage_weighs_the_loss_of_latent_cells_an_object_touches(monkeypatch):
    from types import SimpleNamespace as NS

    from comat.toy import recipes

    recipe = recipes.UnetRecipe()
    latents, noise = torch.zeros(1, 4, 16, 16), torch.randn(1, 4, 16, 16)
    recipe.batch, recipe.prompt_dropout = 1, 0.0
    recipe.vae = NS(config=NS(scaling_factor=1.0), encode=lambda x: NS(latent_dist=NS(sample=lambda: latents)))
    recipe.text_encoder = lambda ids: NS(last_hidden_state=torch.zeros(1, 77, 8))
    masks = np.zeros((1, 64, 64), bool)
    masks[0, 22, 21] = True  # one object pixel: latent cell (5, 5) counts as the object's
    scene = NS(masks=masks)
    monkeypatch.setattr(recipes, "sample_batch", lambda n, rng, categories: (torch.zeros(1, 3, 64, 64), ["a"], [scene]))
    monkeypatch.setattr(torch, "randn_like", lambda x: noise)
    monkeypatch.setattr(torch, "randint", lambda *args, **kwargs: torch.tensor([999]))  # zero SNR: min-SNR weight 1
    error = torch.zeros(1, 4, 16, 16)
    error[:, :, 0, 0], error[:, :, 5, 5] = 1.0, 2.0  # background cell, object cell

    def loss_at(step):
        recipe.at_step(step, {}, torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0))
        unet = lambda x, t, context: NS(sample=recipe.scheduler.get_velocity(latents, noise, t) + error)
        return recipe.loss({"unet": unet}, np.random.default_rng(0))[0].item()

    k = recipe.third_object_weight
    assert loss_at(recipe.restart_steps[2] - 1) == pytest.approx((1 + 4) / 256)
    assert loss_at(recipe.restart_steps[2]) == pytest.approx((1 + (1 + k) * 4) / (256 + k))


def test_vae_second_stage_trains_the_decoder_alone_and_the_third_everything(tmp_path):
    from comat.toy.recipes import VaeRecipe

    recipe = VaeRecipe()
    modules = recipe.build(tmp_path)
    vae = modules["vae"]
    recipe.at_step(recipe.encoder_steps - 1, modules, None)
    assert all(p.requires_grad for p in vae.parameters()) and not recipe.object_weight
    recipe.batch = 2
    encoder = [*vae.encoder.parameters(), *vae.quant_conv.parameters()]
    for step, encoder_trains in ((recipe.encoder_steps, False), (recipe.restart_steps[0], True)):
        recipe.at_step(step, modules, None)
        vae.zero_grad(set_to_none=True)
        loss, _ = recipe.loss(modules, np.random.default_rng(0))
        loss.backward()
        assert recipe.object_weight
        assert all((p.grad is not None) == encoder_trains for p in encoder)
        assert all(p.grad is not None for p in vae.decoder.parameters())


class FirstRecipe(LinearRecipe):
    name, steps = "first", 4

    def export(self, modules, zoo):
        super().export(modules, zoo)
        (zoo / "first.done").write_text(str(time.time()))


class SecondRecipe(LinearRecipe):
    """Needs ``first``; records whether ``first`` was finished when it started."""

    name, requires, steps = "second", ("first",), 4

    def build(self, zoo):
        self.first_finished = (zoo / "first.done").is_file()
        return super().build(zoo)

    def export(self, modules, zoo):
        (zoo / self.name).mkdir(parents=True)
        (zoo / "second.saw_first").write_text(str(self.first_finished))


class PausingRecipe(LinearRecipe):
    name, steps = "pausing", 10**6


class NeedsPausing(SecondRecipe):
    name, requires = "needs_pausing", ("pausing",)


def test_parallel_pretraining_waits_for_dependencies(tmp_path):
    log = []
    assert pretrain_zoo([FirstRecipe, SecondRecipe, LinearRecipe], PretrainConfig(), zoo=tmp_path, work=tmp_path / "w",
                        jobs=2, log=log.append)
    assert (tmp_path / "second.saw_first").read_text() == "True"
    assert (tmp_path / "lin.pt").is_file() and len(log) == 3
    log.clear()  # a second run finds everything in the zoo... once the toy records say so
    for name in ("first", "second", "lin"):
        (tmp_path / name / "training.json").write_text('{"steps": 4}' if name != "lin" else '{"steps": 12}')
    assert pretrain_zoo([FirstRecipe, SecondRecipe, LinearRecipe], PretrainConfig(), zoo=tmp_path, work=tmp_path / "w",
                        jobs=2, log=log.append)
    assert all("already in the zoo" in line for line in log)


def test_a_paused_model_holds_back_what_needs_it(tmp_path):
    log = []
    done = pretrain_zoo([PausingRecipe, NeedsPausing], PretrainConfig(max_minutes=0.0), zoo=tmp_path,
                        work=tmp_path / "w", jobs=2, log=log.append)
    assert not done and log == ["pausing: paused (checkpointed); rerun to resume"]


def test_parallel_wall_time_follows_dependencies():
    seconds = {"clip": 2.0, "vae": 3.0, "t2i": 10.0, "blip": 1.0, "vqa": 4.0}
    requires = {"t2i": ("clip", "vae")}
    # Core 1: clip 0-2, blip 2-3, vqa 3-7; core 2: vae 0-3, t2i 3-13 (it waits for both).
    assert parallel_wall_seconds(seconds, requires, jobs=2) == 13.0
    assert parallel_wall_seconds(seconds, requires, jobs=1) == sum(seconds.values())
    # A dependency already in the zoo (absent from the times) does not hold anything back.
    assert parallel_wall_seconds({"t2i": 10.0, "blip": 1.0}, requires, jobs=2) == 10.0


class SleepyRecipe(LinearRecipe):
    """20 ms a step on top of the tiny regression, for a long schedule."""

    name, steps = "sleepy", 1000

    def loss(self, modules, rng):
        time.sleep(0.02)
        return super().loss(modules, rng)


class QuickRecipe(LinearRecipe):
    name, steps = "quick", 100


def test_profile_times_steps_and_extrapolates_without_training(tmp_path):
    from comat.toy.pretrain import profile_zoo

    profile = profile_zoo([SleepyRecipe, QuickRecipe], PretrainConfig(), zoo=tmp_path, jobs=2)
    sleepy, quick = profile["models"]["sleepy"], profile["models"]["quick"]
    assert 0.02 <= sleepy["seconds_per_step"] < 0.05 and quick["seconds_per_step"] < 0.02
    assert sleepy["seconds"] == round(sleepy["seconds_per_step"] * 1000) and quick["steps"] == 100
    assert profile["wall_seconds"] == max(sleepy["seconds"], quick["seconds"])  # independent: side by side
    assert profile["total_seconds"] == sleepy["seconds"] + quick["seconds"]
    assert profile["protocol"]["machine"]["cores"] >= 1 and profile["protocol"]["machine"]["cpu"]  # timings need their host
    assert list(tmp_path.iterdir()) == []  # nothing exported, no checkpoints left behind
    with pytest.raises(ComatError, match="multiples of 25"):
        profile_zoo([QuickRecipe], PretrainConfig(), zoo=tmp_path, steps=10)
    with pytest.raises(ComatError, match="lin: schedule shorter"):
        profile_zoo([LinearRecipe], PretrainConfig(), zoo=tmp_path)
