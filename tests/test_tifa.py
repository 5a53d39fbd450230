"""TIFA adapter: choice mapping, upstream's arithmetic on its own sample, duplicates, bad input, toy questions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from comat.core.errors import ComatError
from comat.evaluation.registry import load_protocol
from comat.judges.text_embedder import TextEmbedder
from comat.toy.prompts import parse_prompt
from comat_benchmarks.tifa import (
    QUESTION_FIELDS,
    Tifa,
    check_entries,
    multiple_choice,
    read_questions,
    read_text_inputs,
    tifa_summary,
    toy_data,
    toy_questions,
)

FIXTURES = Path(__file__).parent / "fixtures" / "tifa"
WORDS = ["yes", "no", "green", "black", "yellow", "brown", "pale", "surfer", "beach", "is", "there", "a", "cat"]


def save_tiny_sentence_encoder(path: Path, words: list[str], seed: int = 0) -> Path:
    """A random BERT encoder with its (lower-casing) tokenizer: the all-mpnet-base-v2 code path in miniature."""
    from transformers import BertConfig, BertModel

    from comat.models.tokenizer import word_tokenizer

    torch.manual_seed(seed)
    tok = word_tokenizer(words, path / "vocab")
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def save_tiny_vqa(path: Path, words: list[str]) -> Path:
    """A random BlipForQuestionAnswering with its processor (the tiny captioner's config and vocabulary)."""
    from transformers import BlipConfig, BlipForQuestionAnswering

    from tests.tiny import save_tiny_blip

    save_tiny_blip(path, words)
    BlipForQuestionAnswering(BlipConfig.from_pretrained(path)).save_pretrained(path)
    return path


class FakeJudges:
    """``Judges`` stand-in: answers from a table keyed by (image name, question); a choice mapper that replays."""

    def __init__(self, answers: dict[tuple[str, str], str],
                 mapping: dict[tuple[str, tuple[str, ...]], str] | None = None):
        self.answers, self.mapping, self.mapped, self.ids = answers, mapping or {}, [], []

    def answer(self, paths, questions):
        return [self.answers[(Path(p).name, q)] for p, q in zip(paths, questions)]

    def id(self, role):
        self.ids.append(role)
        return role

    def model(self, role):
        assert role == "text_embedder"
        return self

    def nearest(self, answers, choices):
        self.mapped += list(zip(answers, map(tuple, choices)))
        return [self.mapping[(a, tuple(c))] for a, c in zip(answers, choices)]


def _bench(**options) -> Tifa:
    return Tifa(load_protocol("tifa", "real", {"options": options} if options else None), data=FIXTURES, unpinned=True)


# -- choice mapping ---------------------------------------------------------------------------------------

def test_exact_case_sensitive_match_and_the_rest_through_nearest():
    calls = []

    def nearest(answers, choices):
        calls.append((answers, choices))
        return [c[-1] for c in choices]

    got = multiple_choice(["yes", "Yes", "pale green", "surfer"],
                          [["yes", "no"], ["yes", "no"], ["black", "green"], ["surfer", "diver"]], nearest)
    assert got == ["yes", "no", "green", "surfer"]
    assert calls == [(["Yes", "pale green"], [["yes", "no"], ["black", "green"]])]  # one call, the misses only


def test_sentence_encoder_mean_pools_over_the_mask_and_maps_Yes_to_yes(tmp_path):
    from transformers import AutoModel, AutoTokenizer

    path = save_tiny_sentence_encoder(tmp_path / "sbert", WORDS)
    emb = TextEmbedder.load(path)
    assert emb.pooling == "mean"
    texts = ["yes", "pale green surfer is there"]
    got = emb.embed(texts)
    model, tok = AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    for i, t in enumerate(texts):  # one sentence at a time: no padding at all
        with torch.no_grad():
            hidden = model(**tok([t], return_tensors="pt")).last_hidden_state[0]
        want = torch.nn.functional.normalize(hidden.mean(0), dim=0)
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-5)
    assert torch.allclose(got.norm(dim=1), torch.ones(2))
    # "Yes" is no exact choice upstream; the lower-casing tokenizer makes it the same sentence as "yes" (cosine 1)
    assert multiple_choice(["Yes", "no"], [["no", "yes"], ["yes", "no"]], emb.nearest) == ["yes", "no"]


def test_clip_text_tower_embeds_its_projected_end_of_text_state(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    from comat.models.tokenizer import clip_tokenizer
    from tests.tiny import tiny_text_config

    torch.manual_seed(0)
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 16}
    model = CLIPModel(CLIPConfig(text_config=tiny_text_config().to_dict(), vision_config=vision, projection_dim=16))
    model.save_pretrained(tmp_path / "clip")
    clip_tokenizer().save_pretrained(tmp_path / "clip")
    emb = TextEmbedder.load(tmp_path / "clip")
    assert emb.pooling == "clip"
    tok = clip_tokenizer()
    with torch.no_grad():
        ids = tok(["a red circle"], return_tensors="pt").input_ids
        pooled = model.text_model(input_ids=ids).pooler_output
        want = torch.nn.functional.normalize(model.text_projection(pooled), dim=-1)[0]
    torch.testing.assert_close(emb.embed(["a red circle", "red"])[0], want, rtol=1e-5, atol=1e-5)


# -- upstream's sample, replayed ----------------------------------------------------------------------------

def test_replaying_upstream_answers_gives_upstream_numbers():
    """The upstream sample evaluation (mPLUG answers, SBERT mapping) replayed through the adapter: same TIFA,
    stdev, per-type accuracy and per-caption scores; only the one answer outside its choices is mapped."""
    upstream = json.loads((FIXTURES / "sample_evaluation_result.json").read_text())
    details = upstream["question_details"]
    bench = _bench()
    samples = bench.samples()
    assert [s.id for s in samples] == ["coco_301091", "drawbench_52"]
    assert [s.category for s in samples] == ["coco", "drawbench"]
    answers = {(f"{cid}.png", q): d["free_form_vqa"] for cid, qs in details.items() for q, d in qs.items()}
    mapping = {(d["free_form_vqa"], tuple(d["choices"])): d["multiple_choice_vqa"] for qs in details.values()
               for d in qs.values()}
    judges = FakeJudges(answers, mapping)
    records = bench.score(samples, [[Path(f"{s.id}.png")] for s in samples], judges)
    summary, rows = bench.aggregate(records)
    assert judges.mapped == [("0", ("1", "2", "3", "4"))] and judges.ids == ["text_embedder"]
    assert summary["tifa_average"] == pytest.approx(upstream["tifa_average"])
    assert summary["tifa_stdev"] == pytest.approx(upstream["tifa_stdev"])
    assert summary["accuracy_by_type"] == pytest.approx(upstream["accuracy_by_type"])
    assert summary["caption_scores"] == pytest.approx(upstream["caption_scores"])
    assert rows[0] == {"metric": "TIFA", "score": pytest.approx(0.8125), "n": 2, "over": "prompts"}
    assert {r["metric"]: r["n"] for r in rows}["accuracy counting"] == 3
    # the question file has no pinned sha256: the run says it is unverified
    assert any("no pinned sha256" in n for n in bench.notes)
    assert {d["name"]: d["verified"] for d in bench.data_records} == {
        "tifa_v1.0_text_inputs.json": False, "tifa_v1.0_question_answers.json": False}


def test_duplicate_rows_count_twice_and_type_accuracy_is_over_questions(tmp_path):
    """Prompt p: object question listed twice (answered right), colour wrong -> 2/3; prompt q: object wrong,
    colour right -> 1/2. TIFA = (2/3 + 1/2) / 2 = 7/12 (with the duplicate dropped it would be (1/2 + 1/2) / 2 =
    1/2). Object accuracy over questions = 2/3 (the mean of per-prompt object means would be 1/2);
    colour 1/2."""
    cat = {"question": "is there a cat?", "choices": ["yes", "no"], "answer": "yes", "element_type": "object"}
    color = {"question": "what color is the cat?", "choices": ["black", "brown"], "element_type": "color"}
    qa = [{"id": "p_1", **cat}, {"id": "p_1", **color, "answer": "black"}, {"id": "p_1", **cat},
          {"id": "q_2", **cat}, {"id": "q_2", **color, "answer": "brown"}]
    (tmp_path / "tifa_v1.0_text_inputs.json").write_text(json.dumps([{"id": "p_1", "caption": "a black cat"},
                                                                     {"id": "q_2", "caption": "a brown cat"}]))
    (tmp_path / "tifa_v1.0_question_answers.json").write_text(json.dumps(qa))
    bench = Tifa(load_protocol("tifa"), data=tmp_path, unpinned=True)
    samples = bench.samples()
    assert [s.meta["n_questions"] for s in samples] == [3, 2]
    judges = FakeJudges({("p.png", "is there a cat?"): "yes", ("p.png", "what color is the cat?"): "brown",
                         ("q.png", "is there a cat?"): "no", ("q.png", "what color is the cat?"): "brown"})
    records = bench.score(samples, [[Path("p.png")], [Path("q.png")]], judges)
    assert [[q["score"] for q in r["questions"]] for r in records] == [[1, 0, 1], [0, 1]]
    summary = tifa_summary(records)
    assert summary["tifa_average"] == pytest.approx(7 / 12)
    assert summary["caption_scores"] == pytest.approx({"p_1": 2 / 3, "q_2": 1 / 2})
    assert summary["accuracy_by_type"] == pytest.approx({"object": 2 / 3, "color": 1 / 2})
    assert summary["tifa_by_source"] == pytest.approx({"p": 2 / 3, "q": 1 / 2})
    assert judges.mapped == []  # every answer was a choice: the embedder is never loaded or recorded
    assert judges.ids == []


def test_several_images_per_prompt_pool_their_questions():
    records = [{"id": "a", "category": "c", "questions": [{"element_type": "object", "score": s} for s in scores]}
               for scores in ([1, 1], [1, 0])] + [{"id": "b", "category": "c",
                                                   "questions": [{"element_type": "object", "score": 0}]}]
    summary = tifa_summary(records)
    assert summary["caption_scores"] == {"a": 0.75, "b": 0.0}
    assert summary["tifa_average"] == pytest.approx(0.375)
    assert summary["n_prompts"] == 2 and summary["n_questions"] == 5


# -- bad input ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("content, message", [
    ('{"id": "x"}', r"top level is a JSON dict, not a list; expected a JSON list of \{\"id\""),
    ('[\n {"id": "x",\n  "question": }\n]', r"line 3 column 15: invalid JSON"),
    (('[{"id": "x", "question": "q?", "choices": ["yes"], "answer": "yes", "element_type": "object"}, '
      '{"id": "y", "question": "q?", "answer": "yes", "element_type": "object"}]'),
     r"entry 1 \(id y\) has no field 'choices'"),
    ('[{"id": "x", "question": "q?", "choices": "yes,no", "answer": "yes", "element_type": "object"}]',
     r"entry 0 \(id x\): field 'choices' is \"yes,no\", not a non-empty list of strings"),
    ('[["x", "q?"]]', r"entry 0 is a JSON list, not an object"),
])
def test_malformed_question_file_is_one_line_naming_file_and_place(tmp_path, content, message):
    path = tmp_path / "tifa_v1.0_question_answers.json"
    path.write_text(content)
    with pytest.raises(ComatError, match=message) as err:
        read_questions(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_text_inputs_need_id_and_caption_and_questions_need_known_ids(tmp_path):
    (tmp_path / "tifa_v1.0_text_inputs.json").write_text('[{"id": "a", "text": "a cat"}]')
    with pytest.raises(ComatError, match=r"entry 0 \(id a\) has no field 'caption'"):
        read_text_inputs(tmp_path / "tifa_v1.0_text_inputs.json")
    (tmp_path / "tifa_v1.0_text_inputs.json").write_text('[{"id": "a", "caption": "a cat"}]')
    (tmp_path / "tifa_v1.0_question_answers.json").write_text(
        '[{"id": "b", "question": "q?", "choices": ["yes", "no"], "answer": "yes", "element_type": "object"}]')
    with pytest.raises(ComatError, match=r"entry 0: question id 'b' is not among the text inputs"):
        Tifa(load_protocol("tifa"), data=tmp_path, unpinned=True).samples()


def test_text_inputs_must_be_the_pinned_file_unless_unpinned():
    with pytest.raises(ComatError, match=r"sha256 .* is not the pinned 650281d508b0"):
        Tifa(load_protocol("tifa"), data=FIXTURES).samples()


# -- the toy world ------------------------------------------------------------------------------------------

def test_toy_questions_of_one_prompt():
    spec = parse_prompt("a big striped red circle on the left of a blue square")
    rows = toy_questions("toy_x_000", spec)
    assert [(r["question"], r["answer"], r["element_type"]) for r in rows] == [
        ("is there a circle?", "yes", "object"),
        ("is the circle red?", "yes", "color"),
        ("what color is the circle?", "red", "color"),
        ("what shape is the red object?", "circle", "shape"),
        ("what texture is the circle?", "striped", "texture"),
        ("what size is the circle?", "big", "size"),
        ("is there a square?", "yes", "object"),
        ("is the square blue?", "yes", "color"),
        ("what color is the square?", "blue", "color"),
        ("what shape is the blue object?", "square", "shape"),
        ("is the circle on the left of the square?", "yes", "spatial"),
    ]
    colour = rows[2]["choices"]
    assert len(set(colour)) == 4 and "red" in colour
    assert toy_questions("toy_x_000", spec) == rows  # deterministic
    assert all(r["id"] == "toy_x_000" and r["caption"] == spec.text for r in rows)
    counting = toy_questions("toy_y_000", parse_prompt("two green crosses and a square"))
    assert [(r["question"], r["choices"], r["answer"], r["element_type"]) for r in counting] == [
        ("are there two green crosses?", ["yes", "no"], "yes", "counting"),
        ("how many crosses are there?", ["0", "1", "2", "3"], "2", "counting"),
        ("is there a square?", ["yes", "no"], "yes", "object"),
    ]


def test_toy_tifa_covers_every_toy_eval_prompt_in_the_official_format():
    from comat.toy.prompts import CATEGORIES, prompt_specs

    inputs, rows = toy_data()
    assert len(inputs) == sum(len(prompt_specs(c, "eval")) for c in CATEGORIES)
    check_entries(rows, QUESTION_FIELDS, "toy", "the TIFA format")  # raises on any malformed row
    assert all(r["answer"] in r["choices"] for r in rows)
    assert {r["element_type"] for r in rows} == {"object", "color", "shape", "texture", "size", "counting", "spatial"}
    bench = Tifa(load_protocol("tifa", "toy"))
    samples = bench.samples()
    assert len(samples) == len(inputs) and samples[0].category == "single"
    assert bench.samples() == samples and sum(map(len, bench.questions.values())) == len(rows)  # idempotent
    assert bench.data_records[0]["questions"] == len(rows)


# -- end to end ---------------------------------------------------------------------------------------------

def test_evaluate_end_to_end_on_a_tiny_pipeline(tiny_sd_dir, tmp_path, monkeypatch):
    from comat.evaluation.runner import EvalConfig, evaluate

    monkeypatch.setenv("COMAT_CACHE", str(tmp_path / "cache"))
    vqa = save_tiny_vqa(tmp_path / "vqa", WORDS)
    sbert = save_tiny_sentence_encoder(tmp_path / "sbert", WORDS)
    cfg = EvalConfig(model=str(tiny_sd_dir), data=str(FIXTURES), unpinned=True, device="cpu",
                     judges={"vqa": str(vqa), "text_embedder": str(sbert)})
    out = evaluate("tifa", cfg, tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "tifa.samples.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["coco_301091", "drawbench_52"]
    for r in records:  # every mapped answer is a choice, and the score follows from it
        for q in r["questions"]:
            assert q["multiple_choice_vqa"] in q["choices"]
            assert q["score"] == int(q["multiple_choice_vqa"] == q["answer"])
    assert out["aggregate"]["tifa_average"] == pytest.approx(tifa_summary(records)["tifa_average"])
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert set(manifest["judges"]) <= {"vqa", "text_embedder"} and "vqa" in manifest["judges"]
    assert manifest["counts"]["images"] == 2
    assert "Protocol: benchmark=tifa" in (tmp_path / "run" / "tifa.md").read_text()
    again = evaluate("tifa", cfg, tmp_path / "run2")
    assert again["manifest"]["counts"]["generated"] == 0 and again["manifest"]["counts"]["judge_answers_computed"] == 0
    assert again["aggregate"]["tifa_average"] == out["aggregate"]["tifa_average"]
