import json

import pytest
import torch
from typer.testing import CliRunner

from comat.cli import app
from comat.core.errors import ComatError
from comat.core.results import read_jsonl
from comat.evaluation.attack import (
    AttackSettings,
    PromptAttacker,
    ZeroShotClassifier,
    attack_succeeded,
    gumbel_softmax,
    margin_loss,
    vocabulary,
)
from comat.evaluation.registry import load_protocol
from comat.evaluation.runner import EvalConfig, evaluate
from comat.generation.sampling import encode, null_embeds
from comat.judges.clip import ClipJudge
from comat_benchmarks.prompt_attack import PromptAttack
from tests.tiny import save_tiny_clip, tiny_sd_pipeline, tiny_sdxl_pipeline

FAST = AttackSettings(tokens=2, iterations=2, steps=2, guidance=2.0)


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def classifier(tiny_clip_dir):
    return ZeroShotClassifier(ClipJudge.load(tiny_clip_dir), [["a circle", "a red circle"], ["a square"], ["a cross"]])


def test_margin_loss_hand_case():
    logits = torch.tensor([[5.0, 3.0, 1.0], [1.0, 3.0, 5.0]])
    # true 5 vs best other 3, +30 -> 32; true 3 vs best other 5, +30 -> 28
    assert margin_loss(logits, torch.tensor([0, 1]), 30.0).tolist() == [32.0, 28.0]
    # without kappa a sample already misclassified costs nothing; a correct one its lead
    assert margin_loss(logits, torch.tensor([2, 2]), 0.0).tolist() == [0.0, 2.0]


def test_gumbel_softmax_is_a_distribution_and_reproducible_per_sample():
    logits = torch.randn(2, 3, 7, requires_grad=True)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (1, 2)]  # noqa: E731
    soft = gumbel_softmax(logits, 1.0, generators=gens())
    assert soft.shape == (2, 3, 7) and (soft >= 0).all()
    assert torch.allclose(soft.sum(-1), torch.ones(2, 3))
    assert torch.equal(soft, gumbel_softmax(logits, 1.0, generators=gens()))
    # a sample's draw does not depend on its batch neighbours
    assert torch.allclose(gumbel_softmax(logits[1:], 1.0, generators=[torch.Generator().manual_seed(2)]), soft[1:])
    hard = gumbel_softmax(logits, 0.5, hard=True, generators=gens())
    assert set(hard.detach().unique().tolist()) <= {0.0, 1.0} and torch.allclose(hard.sum(-1), torch.ones(2, 3))
    (hard * torch.arange(7.0)).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_success_rule():
    assert attack_succeeded("tench", "a photo of a tench and a goldfish", predicted=1, label=0)
    assert not attack_succeeded("tench", "a photo of a tench and a goldfish", predicted=0, label=0)
    # the class name is gone from the prompt: not a success, even though the image is misclassified
    assert not attack_succeeded("tench", "a photo of a goldfish and a goldfish", predicted=1, label=0)
    # decoded text is lower case; capitalised class names still count as present
    assert attack_succeeded("American robin", "a photo of a american robin and a cat", predicted=3, label=15)


@pytest.mark.parametrize("build", [tiny_sd_pipeline, tiny_sdxl_pipeline], ids=["sd", "sdxl"])
def test_one_hot_soft_tokens_encode_like_the_text(build, classifier):
    """The spliced embeddings sit where the tokenizer would put the appended word, in every text encoder."""
    pipe = build()
    candidates = vocabulary(pipe.tokenizer, ["red", "blue", "square"])
    attacker = PromptAttacker(pipe, classifier, FAST, candidates)
    prompt = "a photo of a circle and a"
    red = candidates.tolist().index(pipe.tokenizer("red", add_special_tokens=False).input_ids[0])
    square = candidates.tolist().index(pipe.tokenizer("square", add_special_tokens=False).input_ids[0])
    weights = torch.zeros(1, 2, len(candidates))
    weights[0, 0, red] = weights[0, 1, square] = 1.0
    null = null_embeds(pipe)
    body, cut = attacker.layout(prompt)
    with torch.no_grad(), attacker.soft_tokens([body], weights):
        spliced = encode(pipe, [""], null)  # the text handed to the pipeline is ignored
    with torch.no_grad():
        text = encode(pipe, [prompt + " red square"], null)
    assert not cut
    assert torch.allclose(spliced.cond, text.cond, atol=1e-5)
    if spliced.pooled is not None:
        assert torch.allclose(spliced.pooled, text.pooled, atol=1e-5)
    with torch.no_grad():  # the hooks are gone afterwards
        assert torch.allclose(encode(pipe, [prompt], null).cond, encode(pipe, [prompt], null).cond)
        assert not torch.allclose(encode(pipe, [prompt], null).cond, text.cond)


def test_gradients_reach_only_the_attack_logits_and_runs_are_reproducible(classifier):
    pipe = tiny_sd_pipeline()
    attacker = PromptAttacker(pipe, classifier, FAST, vocabulary(pipe.tokenizer, ["red", "blue", "square", "cross"]))
    prompt = "a photo of a circle and a"
    logits = torch.zeros(1, 2, len(attacker.candidates), requires_grad=True)
    gens = [torch.Generator().manual_seed(0)]
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    loss, class_logits = attacker.loss([attacker.layout(prompt)[0]], gumbel_softmax(logits, generators=gens),
                                       torch.tensor([0]), latents, gens)
    assert class_logits.shape == (1, 3)
    # kappa 30 dominates a random classifier's margins: the loss is active
    assert loss.item() > 0
    loss.sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    modules = [m for m in (*pipe.components.values(), classifier) if isinstance(m, torch.nn.Module)]
    frozen = [p for m in modules for p in m.parameters()]
    assert frozen and all(not p.requires_grad and p.grad is None for p in frozen)

    first = attacker.run([prompt, "a photo of a square and a"], [0, 1], [3, 4])
    again = attacker.run(["a photo of a square and a"], [1], [4])
    assert first[1].token_ids == again[0].token_ids and first[1].losses == again[0].losses
    assert len(first[0].losses) == FAST.iterations and len(first[0].token_ids) == FAST.tokens
    assert first[0].final_prompt.startswith(prompt + " ") and first[0].final_prompt.endswith(first[0].attack_text)


def test_tiny_end_to_end_attack_run(tiny_sd_dir, tiny_clip_dir, tmp_path):
    cfg = EvalConfig(model=str(tiny_sd_dir), world="toy", judges={"clip": str(tiny_clip_dir)}, images_per_prompt=1,
                     steps=2, batch_size=4, device="cpu", options={"attack": True, "iterations": 2, "tokens": 2})
    result = evaluate("attack", cfg, tmp_path)
    records = read_jsonl(result["files"]["samples"])
    assert len(records) == 4 * 2  # shapes x kinds, one seed each
    assert {r["seed"] for r in records} == {0}
    attacked = [r for r in records if not r["skipped"]]
    skipped = [r for r in records if r["skipped"]]
    assert attacked, "the seeds should leave some clean images classified right"
    for r in skipped:
        assert r["clean_predicted"] != r["classname"] and r["success"] is None
    for r in attacked:
        assert r["clean_predicted"] == r["classname"]
        assert r["final_prompt"] == f"{r['prompt']} {r['attack_text']}" and len(r["attack_tokens"]) == 2
        assert r["success"] == (r["class_in_text"] and r["predicted"] != r["classname"])
    agg = result["aggregate"]
    for kind in ("short", "long"):
        mine = [r for r in attacked if r["category"] == kind]
        assert agg["counts"][kind]["attacked"] == len(mine)
        if mine:
            rate = 100 * sum(r["success"] for r in mine) / len(mine)
            assert agg["success_rate"][kind] == pytest.approx(rate, abs=0.01)
    md = result["files"]["markdown"].read_text()
    assert "CoMat-SD1.5" in md and "49.1" in md and "iterations=2" in md and "relaxation=soft" in md
    manifest = json.loads(result["files"]["manifest"].read_text())
    assert manifest["classes"] == [0, 1, 2, 3] and manifest["settings"]["lr"] == 0.3
    assert manifest["judges"]["clip"].startswith("clip:") and manifest["counts"]["attacked"] == len(attacked)


def _write(path, text):
    path.write_text(text)
    return path


def test_bad_csv_is_one_line_naming_file_and_column(tmp_path):
    protocol = load_protocol("attack", "real")
    _write(tmp_path / "imageNet_short_prompt.csv", "prompt,classname\na photo of a tench and a,tench\n")
    _write(tmp_path / "imageNet_long_prompt.csv", "prompt,label,classname\nThe tench is a fish.,0,tench\n")
    with pytest.raises(ComatError) as e:
        PromptAttack(protocol, data=tmp_path, unpinned=True).samples()
    message = str(e.value)
    assert "\n" not in message and "imageNet_short_prompt.csv" in message and "missing column 'label'" in message
    _write(tmp_path / "imageNet_short_prompt.csv",
           "prompt,label,classname\na photo of a tench,0,tench\na photo of a goldfish,one,goldfish\n")
    with pytest.raises(ComatError, match="imageNet_short_prompt.csv, line 3: label 'one' is not an integer"):
        PromptAttack(protocol, data=tmp_path, unpinned=True).samples()
    with pytest.raises(ComatError, match="sha256 .* is not the pinned"):
        PromptAttack(protocol, data=tmp_path).samples()


def test_class_subset_and_cli_errors():
    bench = PromptAttack(load_protocol("attack", "toy"))
    samples = bench.samples()
    assert bench.classes == ["circle", "square", "triangle", "cross"]
    chosen, labels = bench.select(samples, ["short"], ["Square", "3"], None)
    assert labels == [1, 3] and [s.prompt for s in chosen] == ["a photo of a square and a", "a photo of a cross and a"]
    assert bench.select(samples, ["long"], [], 2)[1] == [0, 2]
    with pytest.raises(ComatError, match="unknown class 'hexagon'"):
        bench.select(samples, ["short"], ["hexagon"], None)
    result = CliRunner().invoke(app, ["attack", "--kind", "medium"])
    assert isinstance(result.exception, ComatError) and "unknown prompt kind medium" in str(result.exception)
