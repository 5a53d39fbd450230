"""TIFA (Hu et al. 2023): question answering on generated images.

Scoring follows the official ``tifascore`` code (``tifa_score_benchmark`` and ``VQAModel.multiple_choice_vqa``):

* the VQA judge answers each question freely; an answer that is one of the choices (exact, case-sensitive:
  "Yes" is not "yes") is taken as is, any other becomes the choice nearest to it by sentence-embedding cosine
  (the ``text_embedder`` judge: all-mpnet-base-v2, mean pooling, unit length);
* a question scores 1 when that choice is the annotated answer, else 0; every row of the question file
  counts, so a question listed twice for a prompt is scored twice;
* a prompt's score is the mean over its questions (over all its images' questions when a protocol asks for
  several images per prompt; upstream scores one), TIFA is the mean of the per-prompt means, and the accuracy
  of an element type is the mean over all questions of that type (not over prompts).

The toy world asks questions generated from the toy prompts in the same file format (``toy_questions``).
"""

from __future__ import annotations

import hashlib
import json
import statistics
import zlib
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from comat.core.errors import ComatError
from comat.evaluation.benchmark import Benchmark, Sample
from comat.evaluation.registry import register

TEXT_INPUTS = "tifa_v1.0_text_inputs.json"
QUESTION_ANSWERS = "tifa_v1.0_question_answers.json"
TEXT_INPUT_FORM = 'a JSON list of {"id": str, "caption": str} objects (tifa_v1.0_text_inputs.json)'
QUESTION_FORM = ('a JSON list of {"id": str, "question": str, "choices": [str, ...], "answer": str, '
                 '"element_type": str} objects (tifa_v1.0_question_answers.json)')
TEXT_INPUT_FIELDS = {"id": str, "caption": str}
QUESTION_FIELDS = {"id": str, "question": str, "choices": list, "answer": str, "element_type": str}

YES_NO = ("yes", "no")
TOY_COUNTS = ("0", "1", "2", "3")  # the toy VQA answers counts with these digits


# -- the official files -------------------------------------------------------------------------------------

def load_json_list(path: Path, form: str) -> list:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ComatError(f"{path}: line {e.lineno} column {e.colno}: invalid JSON ({e.msg}); expected {form}") from None
    except UnicodeDecodeError:
        raise ComatError(f"{path}: not UTF-8 text; expected {form}") from None
    if not isinstance(data, list):
        raise ComatError(f"{path}: top level is a JSON {type(data).__name__}, not a list; expected {form}")
    return data


def check_entries(entries: Sequence, fields: dict[str, type], source: str, form: str) -> list[dict]:
    """Each entry is an object with ``fields`` of the right types (choices: a non-empty list of strings)."""
    for i, entry in enumerate(entries):
        where = f"{source}: entry {i}"
        if not isinstance(entry, dict):
            raise ComatError(f"{where} is a JSON {type(entry).__name__}, not an object; expected {form}")
        if isinstance(entry.get("id"), str):
            where += f" (id {entry['id']})"
        for field, kind in fields.items():
            value = entry.get(field)
            if field not in entry:
                raise ComatError(f"{where} has no field '{field}'; expected {form}")
            bad_choices = field == "choices" and not (value and all(isinstance(c, str) for c in value))
            if not isinstance(value, kind) or bad_choices:
                want = "a non-empty list of strings" if field == "choices" else f"a {kind.__name__}"
                raise ComatError(f"{where}: field '{field}' is {json.dumps(value)[:60]}, not {want}; expected {form}")
    return list(entries)


def read_text_inputs(path: Path) -> list[dict]:
    return check_entries(load_json_list(path, TEXT_INPUT_FORM), TEXT_INPUT_FIELDS, str(path), TEXT_INPUT_FORM)


def read_questions(path: Path) -> list[dict]:
    return check_entries(load_json_list(path, QUESTION_FORM), QUESTION_FIELDS, str(path), QUESTION_FORM)


# -- scoring --------------------------------------------------------------------------------------------------

def multiple_choice(answers: Sequence[str], choices: Sequence[Sequence[str]],
                    nearest: Callable[[list[str], list[list[str]]], list[str]]) -> list[str]:
    """Upstream ``multiple_choice_vqa``: an answer found among its choices stays, the others go to ``nearest``
    (called once, for those only)."""
    todo = [i for i, (a, cs) in enumerate(zip(answers, choices)) if a not in cs]
    mapped = nearest([answers[i] for i in todo], [list(choices[i]) for i in todo]) if todo else []
    out = list(answers)
    for i, m in zip(todo, mapped):
        out[i] = m
    return out


def _mean(xs: Sequence[float]) -> float:
    return float(statistics.fmean(xs))


def tifa_summary(records: Sequence[dict]) -> dict[str, Any]:
    """TIFA from per-image records (``id``, ``category``, ``questions`` with ``element_type`` and ``score``)."""
    per_prompt: dict[str, list[int]] = defaultdict(list)
    per_type: dict[str, list[int]] = defaultdict(list)
    source: dict[str, str] = {}
    for r in records:
        source[r["id"]] = r["category"]
        for q in r["questions"]:
            per_prompt[r["id"]].append(q["score"])
            per_type[q["element_type"]].append(q["score"])
    caption_scores = {i: _mean(s) for i, s in per_prompt.items()}
    by_source: dict[str, list[float]] = defaultdict(list)
    for i, s in caption_scores.items():
        by_source[source[i]].append(s)
    means = list(caption_scores.values())
    return {
        "tifa_average": _mean(means) if means else float("nan"),
        "tifa_stdev": statistics.stdev(means) if len(means) > 1 else None,
        "accuracy_by_type": {t: _mean(s) for t, s in per_type.items()},
        "questions_by_type": {t: len(s) for t, s in per_type.items()},
        "tifa_by_source": {c: _mean(s) for c, s in by_source.items()},
        "prompts_by_source": {c: len(s) for c, s in by_source.items()},
        "n_prompts": len(means),
        "n_questions": sum(len(s) for s in per_type.values()),
        "caption_scores": caption_scores,
    }


# -- the toy world ----------------------------------------------------------------------------------------

def toy_questions(sample_id: str, spec) -> list[dict]:
    """TIFA-format questions about a toy prompt (a ``comat.toy.prompts.PromptSpec``), in the toy VQA's language.

    Per singular mention: "is there a <shape>?" (object), "is the <shape> <color>?" and "what color is the
    <shape>?" with four colour choices (color), "what shape is the <color> object?" when that colour names one
    mention (shape), "what texture/size is the <shape>?" (texture, size); per plural mention: "are there <two
    red circles>?" and "how many <circles> are there?" (counting); for the relation: "is the <shape> <relation>
    the <shape>?" (spatial). Every annotated answer is what the prompt says; distractor colours and the choice
    order come from a generator seeded by the prompt, so the set is the same on every machine.
    """
    from comat.toy.prompts import COLORS, SHAPES, SIZES, TEXTURES, Mention

    rng = np.random.default_rng(zlib.crc32(spec.text.encode()))
    rows: list[dict] = []

    def add(question: str, choices: Sequence[str], answer: str, element_type: str, element: str) -> None:
        rows.append({"id": sample_id, "caption": spec.text, "question": question, "choices": list(choices),
                     "answer": answer, "element_type": element_type, "element": element})

    shapes = [m.shape for m in spec.mentions]
    colors = [m.color for m in spec.mentions]
    for m in spec.mentions:
        if m.count > 1:
            plural = Mention(m.shape, count=2).text.split()[-1]
            add(f"are there {m.text}?", YES_NO, "yes", "counting", str(m.count))
            add(f"how many {plural} are there?", TOY_COUNTS, str(m.count), "counting", str(m.count))
            continue
        add(f"is there {Mention(m.shape).text}?", YES_NO, "yes", "object", m.shape)
        if shapes.count(m.shape) > 1:  # "the <shape>" would not say which one
            continue
        the = f"the {m.shape}"
        if m.color:
            others = [c for c in COLORS if c != m.color]
            options = [m.color, *(others[k] for k in rng.choice(len(others), size=3, replace=False))]
            add(f"is {the} {m.color}?", YES_NO, "yes", "color", m.color)
            add(f"what color is {the}?", [options[k] for k in rng.permutation(4)], m.color, "color", m.color)
            if colors.count(m.color) == 1:
                add(f"what shape is the {m.color} object?", SHAPES, m.shape, "shape", m.shape)
        if m.texture:
            add(f"what texture is {the}?", TEXTURES, m.texture, "texture", m.texture)
        if m.size:
            add(f"what size is {the}?", SIZES, m.size, "size", m.size)
    if spec.relation:
        phrase, a, b = spec.relation
        add(f"is the {shapes[a]} {phrase} the {shapes[b]}?", YES_NO, "yes", "spatial", phrase)
    return rows


def toy_data() -> tuple[list[dict], list[dict]]:
    """Text inputs and questions of the toy TIFA: every toy eval prompt, ids ``toy_<category>_<index>``."""
    from comat.toy.prompts import CATEGORIES, prompt_specs

    inputs, rows = [], []
    for cat in CATEGORIES:
        for i, spec in enumerate(prompt_specs(cat, "eval")):
            sid = f"toy_{cat}_{i:03d}"
            inputs.append({"id": sid, "caption": spec.text})
            rows += toy_questions(sid, spec)
    return inputs, rows


def source_of(text_id: str) -> str:
    """The prompt's source, TIFA's id prefix: coco, drawbench, partiprompt, paintskill (toy: the category)."""
    return text_id.removeprefix("toy_").rsplit("_", 1)[0]


@register
class Tifa(Benchmark):
    name = "tifa"

    def __init__(self, protocol, **kwargs):
        super().__init__(protocol, **kwargs)
        self.questions: dict[str, list[dict]] = {}

    def samples(self) -> list[Sample]:
        if self.toy:
            inputs, rows = toy_data()
            digest = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()
            self.data_records.append({"name": "toy TIFA questions (generated by comat_benchmarks.tifa.toy_questions)",
                                      "sha256": digest, "questions": len(rows)})
            source = "toy TIFA questions"
        else:
            inputs = read_text_inputs(self.fetch(TEXT_INPUTS).path)
            got = self.fetch(QUESTION_ANSWERS)
            rows = read_questions(got.path)
            source = str(got.path)
            if not got.pinned:
                self.notes.append(f"{QUESTION_ANSWERS} has no pinned sha256 (it was not available when the protocol "
                                  f"was written): scored unverified, sha256 {got.sha256}")
        known = {e["id"] for e in inputs}
        self.questions = {}
        for i, row in enumerate(rows):
            if row["id"] not in known:
                raise ComatError(f"{source}: entry {i}: question id '{row['id']}' is not among the text inputs; "
                                 f"pass the question file that belongs to {TEXT_INPUTS}")
            self.questions.setdefault(row["id"], []).append(row)
        unasked = [e["id"] for e in inputs if e["id"] not in self.questions]
        if unasked:
            self.notes.append(f"{len(unasked)} text inputs have no questions and are not scored (first: {unasked[0]})")
        return [Sample(e["id"], e["caption"], source_of(e["id"]), {"n_questions": len(self.questions[e["id"]])})
                for e in inputs if e["id"] in self.questions]

    def score(self, samples: Sequence[Sample], images: Sequence[Sequence[Path]], judges) -> list[dict]:
        pairs = [(s, p, seed) for s, paths in zip(samples, images) for p, seed in zip(paths, self.protocol.seeds())]
        flat = [(k, q) for k, (s, _, _) in enumerate(pairs) for q in self.questions[s.id]]
        answers = judges.answer([pairs[k][1] for k, _ in flat], [q["question"] for _, q in flat])

        def nearest(free: list[str], choices: list[list[str]]) -> list[str]:
            judges.id("text_embedder")  # the manifest lists it only when it was used
            return judges.model("text_embedder").nearest(free, choices)

        chosen = multiple_choice(answers, [q["choices"] for _, q in flat], nearest)
        records = [{"id": s.id, "category": s.category, "prompt": s.prompt, "seed": seed, "image": str(p),
                    "questions": []} for s, p, seed in pairs]
        for (k, q), free, mc in zip(flat, answers, chosen):
            records[k]["questions"].append({
                "question": q["question"], "choices": q["choices"], "answer": q["answer"],
                "element_type": q["element_type"], "element": q.get("element"), "free_form_vqa": free,
                "multiple_choice_vqa": mc, "score": int(mc == q["answer"])})
        for r in records:
            r["score"] = _mean([q["score"] for q in r["questions"]])
        return records

    def aggregate(self, records: Sequence[dict]) -> tuple[dict, list[dict]]:
        summary = tifa_summary(records)
        rows = [{"metric": "TIFA", "score": summary["tifa_average"], "n": summary["n_prompts"], "over": "prompts"}]
        rows += [{"metric": f"TIFA {c}", "score": v, "n": summary["prompts_by_source"][c], "over": "prompts"}
                 for c, v in summary["tifa_by_source"].items()]
        rows += [{"metric": f"accuracy {t}", "score": v, "n": summary["questions_by_type"][t], "over": "questions"}
                 for t, v in summary["accuracy_by_type"].items()]
        return summary, rows
