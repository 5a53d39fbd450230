"""Toy captioners and VQA judge: recipes train, export loads through the project's loaders, questions are right."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from comat.judges.vqa import VqaJudge, encode_questions
from comat.models.captioners import load_captioner
from comat.models.hub import TOY_ZOO
from comat.toy.prompts import parse_prompt
from comat.toy.quality import (
    ATTRIBUTE_KINDS,
    KIND_WEIGHTS,
    YES_NO_KINDS,
    _eval_scenes,
    captioner_swap_accuracy,
    random_question,
    scene_questions,
    vqa_accuracy,
)
from comat.toy.recipes_text import PATCH, TEXT_RECIPES, attention_targets, caption_batch
from comat.toy.world import RGB, ObjectSpec, Scene, render

PARAMETER_LIMIT = 1_500_000


def _step(name: str):
    recipe = TEXT_RECIPES[name]()
    torch.manual_seed(0)
    modules = recipe.build(None)
    loss, logs = recipe.loss(modules, np.random.default_rng(0))
    return recipe, modules, loss, logs


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory):
    """Each recipe after one optimiser step, exported into a temporary zoo."""
    zoo = tmp_path_factory.mktemp("zoo")
    out = {}
    for name in TEXT_RECIPES:
        recipe, modules, loss, logs = _step(name)
        loss.backward()
        torch.optim.AdamW([p for m in modules.values() for p in m.parameters()], lr=1e-3).step()
        for m in modules.values():
            m.eval()
        recipe.export(modules, zoo)
        out[name] = (recipe, modules, loss, logs)
    return zoo, out


@pytest.mark.parametrize("name", list(TEXT_RECIPES))
def test_recipe_step_has_finite_loss_and_gradients_on_trainable_params_only(name, trained_once):
    _, modules, loss, logs = trained_once[1][name]
    assert torch.isfinite(loss) and all(np.isfinite(v) for v in logs.values())
    model = modules[name]
    assert sum(p.numel() for p in model.parameters()) < PARAMETER_LIMIT
    for key, module in modules.items():
        for n, p in module.named_parameters():
            assert (p.grad is not None) == p.requires_grad, f"{key}.{n}"


def test_recipe_sizes_fit_the_zoo_budget(trained_once):
    zoo = trained_once[0]
    total = sum(f.stat().st_size for f in zoo.rglob("*.safetensors"))
    assert total < 3 * 2 * PARAMETER_LIMIT  # float16


@pytest.mark.parametrize("kind", ["blip", "git"])
def test_exported_captioner_scores_what_the_recipe_trains(kind, trained_once):
    zoo, trained = trained_once
    recipe, modules, _, _ = trained[kind]
    captioner = load_captioner(kind, zoo / kind)
    prompts = ["a red circle and a blue square", "a big striped green cross on the left of a yellow triangle"]
    images = torch.rand(2, 3, 64, 64)
    got = captioner.log_prob(images, prompts)
    # The recipe's own forward on the same (float16-rounded) weights, scoring the tokens after the prefix.
    model = modules[kind].half().float()
    ids, mask, targets = caption_batch(recipe.tokenizer, prompts, *recipe._ids())
    with torch.no_grad():
        logits, _ = recipe._forward(model, captioner.preprocess(images), ids, mask)
    logp = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None].clamp_min(0))[..., 0]
    scored = (targets[:, 1:] != -100) & (torch.arange(ids.shape[1] - 1) >= 3)  # tokens after [bos] a photography of
    expected = (logp * scored).sum(1)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-3)


def test_vqa_judge_yes_probability_is_the_first_step_yes_no_ratio(trained_once):
    zoo = trained_once[0]
    judge = VqaJudge.load(zoo / "vqa")
    assert judge.image_size == 64 and not judge.interpolate
    images = torch.rand(3, 3, 64, 64)
    questions = ["a red circle?", "is there a big striped square?", "is the cross blue?"]
    model, tok = judge.model, judge.tokenizer
    with torch.no_grad():
        ids = tok(questions, padding="longest", return_tensors="pt")
        input_ids = ids.input_ids.clone()
        input_ids[:, 0] = tok.convert_tokens_to_ids("[ENC]")
        image_embeds = model.vision_model(judge.preprocess(images)).last_hidden_state
        q = model.text_encoder(input_ids=input_ids, attention_mask=ids.attention_mask, encoder_hidden_states=image_embeds).last_hidden_state
        start = torch.full((3, 1), tok.convert_tokens_to_ids("[DEC]"))
        logits = model.text_decoder(input_ids=start, encoder_hidden_states=q, encoder_attention_mask=ids.attention_mask).logits[:, 0]
    probs = logits.softmax(-1)
    yes, no = probs[:, tok.convert_tokens_to_ids("yes")], probs[:, tok.convert_tokens_to_ids("no")]
    torch.testing.assert_close(judge.yes_probability(images, questions), yes / (yes + no), rtol=1e-5, atol=1e-6)
    assert encode_questions(tok, questions)[0][:, 0].eq(tok.convert_tokens_to_ids("[ENC]")).all()
    answers = judge.answer(images, questions, max_new_tokens=3)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)


def test_vqa_judge_reads_pil_images_like_tensors(trained_once):
    judge = VqaJudge.load(trained_once[0] / "vqa")
    arr = (np.random.default_rng(0).random((2, 64, 64, 3)) * 255).astype(np.uint8)
    tensor = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255
    pil = [Image.fromarray(a) for a in arr]
    questions = ["a red circle?", "a blue cross?"]
    torch.testing.assert_close(judge.yes_probability(pil, questions), judge.yes_probability(tensor, questions), atol=1e-5, rtol=1e-4)


def test_vqa_judge_rejects_a_captioner(trained_once):
    from comat.core.errors import ComatError

    with pytest.raises(ComatError, match="not BlipForQuestionAnswering"):
        VqaJudge.load(trained_once[0] / "blip")


# ---------------------------------------------------------------------------------------------
# Questions.

def _scene() -> Scene:
    spec = parse_prompt("a big striped red circle and a small blue square and a small red triangle")
    objs = [("circle", "red", "striped", "big", 14), ("square", "blue", "plain", "small", 52), ("triangle", "red", "plain", "small", 34)]
    return Scene(tuple(ObjectSpec(s, c, t, z, x, 32.0, 22.0 if z == "big" else 13.0, RGB[c], i)
                       for i, (s, c, t, z, x) in enumerate(objs)), None, spec)


_NP = re.compile(r"(a|an|two|three) (?:(small|big) )?(?:(plain|striped|dotted) )?(?:(\w+) )?(circles?|squares?|triangles?|cross(?:es)?)")


def _truth(question: str, objs: list[dict]) -> str:
    """An independent reading of every question template against the ground truth."""
    def matching(**attrs) -> list[dict]:
        return [o for o in objs if all(o[k] == v for k, v in attrs.items() if v)]

    def referent(words: str) -> dict:
        ws = words.split()
        attrs = {k: w for w in ws for k, vals in (("size", ("small", "big")), ("texture", ("plain", "striped", "dotted")),
                                                   ("color", tuple(RGB)), ("shape", ("circle", "square", "triangle", "cross"))) if w in vals}
        found = matching(**attrs)
        assert len(found) == 1, f"referent '{words}' is not unique"
        return found[0]

    if m := re.fullmatch(r"(?:is there |are there )?(.+)\?", question):
        if np_ := _NP.fullmatch(m.group(1)):
            article, size, texture, color, noun = np_.groups()
            shape = noun.rstrip("s") if not noun.startswith("cross") else "cross"
            n = len(matching(shape=shape, color=color, texture=texture, size=size))
            count = {"a": 1, "an": 1, "two": 2, "three": 3}[article]
            return "yes" if (n >= 1 if count == 1 else n == count) else "no"
    if m := re.fullmatch(r"is the (.+) (\w+)\?", question):
        o = referent(m.group(1))
        return "yes" if m.group(2) in o.values() else "no"
    if m := re.fullmatch(r"what (\w+) is the (.+)\?", question):
        return referent(m.group(2).removesuffix(" object"))[m.group(1)]
    if m := re.fullmatch(r"how many (\w+) objects are there\?", question):
        return str(len(matching(color=m.group(1))))
    if m := re.fullmatch(r"how many (\w+) are there\?", question):
        noun = m.group(1)
        return str(len(matching(shape="cross" if noun == "crosses" else noun[:-1])))
    raise AssertionError(f"unknown question template: {question}")


def test_questions_have_the_right_answers_and_balanced_yes_no():
    scene = _scene()
    objs = [o.attributes for o in scene.objects]
    qs = scene_questions(scene, np.random.default_rng(0), 3000)
    for q in qs:
        assert _truth(q.text, objs) == q.answer, q
    assert {q.kind for q in qs} == set(KIND_WEIGHTS)
    yes_no = [q for q in qs if q.yes_no]
    assert 0.45 < np.mean([q.answer == "yes" for q in yes_no]) < 0.55
    for kind in YES_NO_KINDS:
        assert 0.4 < np.mean([q.answer == "yes" for q in yes_no if q.kind == kind]) < 0.6, kind
    assert all(q.answer not in ("yes", "no") for q in qs if q.kind in ATTRIBUTE_KINDS)
    negatives = {q.text for q in qs if q.kind == "phrase" and q.answer == "no"}
    assert "a blue circle?" in negatives or "a red square?" in negatives  # binding errors are asked
    assert all("cross" not in q.text for q in qs if q.answer == "yes")
    for q in qs:  # the referring words name exactly the referred objects
        words = q.text.rstrip("?").split()[q.span[0] : q.span[1]]
        if q.refers and q.kind in ("phrase", "exists") and q.answer == "yes":
            assert _truth(" ".join(words) + "?", [objs[k] for k in q.refers]) == "yes"
        if q.kind in ("verify", "color", "shape", "texture", "size"):
            assert words[0] == "the" and len(q.refers) == 1
    assert any(q.text.startswith("two red") for q in qs)  # exact counts: "two red ...?"


def test_hand_made_questions():
    scene = _scene()
    assert _truth("what shape is the striped object?", [o.attributes for o in scene.objects]) == "circle"
    rng = np.random.default_rng(1)
    counts = {q.text: q.answer for q in (random_question(scene, rng, "count") for _ in range(300))}
    assert counts["how many triangles are there?"] == "1"
    assert counts["how many red objects are there?"] == "2"
    assert counts.get("how many crosses are there?", "0") == "0"


def test_attention_targets_point_at_the_mentioned_object():
    scene = _scene()
    rendered = render(scene)
    weights, used = attention_targets([rendered], 20, 4)
    # "a big striped red circle and a small blue square and a small red triangle" after [DEC] a photography of
    assert used[0].nonzero().flatten().tolist() == [5, 6, 7, 11, 12, 16, 17]
    g = 64 // PATCH
    for pos, obj in ((6, 0), (11, 1), (16, 2)):
        cover = rendered.masks[obj].reshape(g, PATCH, g, PATCH).sum((1, 3)).reshape(-1)
        torch.testing.assert_close(weights[0, pos], torch.from_numpy(cover / cover.sum()).float())


# ---------------------------------------------------------------------------------------------
# Quality measurements.

class _LookupCaptioner:
    """Scores a caption 1 when it is the true prompt of a held-out scene of an allowed category, else 0."""

    def __init__(self, n: int, seed: int, categories: tuple[str, ...]):
        self.true = {s.prompt for s in _eval_scenes(n, seed, ("color", "shape", "texture", "complex")) if s.category in categories}
        self.seen_shapes: set = set()

    def log_prob(self, images, texts):
        self.seen_shapes.add(tuple(images.shape[1:]))
        return torch.tensor([float(t in self.true) for t in texts])


def test_swap_accuracy_on_fake_captioners():
    every = _LookupCaptioner(16, 3, ("color", "shape", "texture", "complex"))
    assert captioner_swap_accuracy(every, n_scenes=16, seed=3) == 1.0
    assert every.seen_shapes == {(3, 64, 64)}
    assert captioner_swap_accuracy(_LookupCaptioner(16, 3, ("color",)), n_scenes=16, seed=3) == 0.25
    assert captioner_swap_accuracy(_LookupCaptioner(16, 3, ()), n_scenes=16, seed=3) == 0.0  # ties are losses


class _NoJudge:
    def yes_probability(self, images, questions):
        return torch.zeros(len(questions))

    def answer(self, images, questions):
        return ["red"] * len(questions)


def test_vqa_accuracy_of_a_constant_judge():
    res = vqa_accuracy(_NoJudge(), n_scenes=20, seed=0)
    assert res["n_questions"] == 120
    assert 0.35 < res["yes_no"] < 0.65
    assert 0.0 < res["per_kind"]["color"] < 0.5 and res["per_kind"]["shape"] == 0.0


# ---------------------------------------------------------------------------------------------
# The committed zoo meets its bars on a small sample (skipped until the models are trained).

@pytest.mark.parametrize("kind", ["blip", "git"])
def test_zoo_captioner_binds_attributes(kind):
    if not (TOY_ZOO / kind).is_dir():
        pytest.skip(f"toy/{kind} not trained yet")
    assert captioner_swap_accuracy(load_captioner(kind, f"toy/{kind}"), n_scenes=64, seed=7) >= 0.85


def test_zoo_vqa_judge_matches_ground_truth():
    if not (TOY_ZOO / "vqa").is_dir():
        pytest.skip("toy/vqa not trained yet")
    assert vqa_accuracy(VqaJudge.load("toy/vqa"), n_scenes=40, seed=7)["accuracy"] >= 0.94
