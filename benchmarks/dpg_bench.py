"""DPG-Bench (ELLA, Hu et al. 2024): dense prompts checked by dependent yes/no questions.

Upstream (``dpg_bench/compute_dpg_bench.py``) scores a 2x2 grid of four images per prompt: every question is
asked of every crop, a question scores 1 only when the answer is exactly "yes", a question whose parent
(``dependency``, 0 = none) scores 0 is set to 0, a crop scores the mean over questions, an image the mean over
its crops, and DPG-Bench is the mean over images x 100. The engine generates the four images separately and
they are the crops; the grid PNG ``<item_id>.png`` is written to ``<out>/grids/`` as well, so upstream's
script can score the same images.

``mode=faithful`` reproduces upstream's quirks exactly:

* the first CSV row is skipped, and a question that depends on it raises (``KeyError``), which upstream catches
  and so drops the whole image from the mean (the run reports every dropped image);
* dependencies are applied in one pass in file order, so a child listed before its parent sees the parent's raw
  answer, and a grandchild after both sees the cascade;
* the L1/L2 category scores use the raw answers (before dependencies) of the last crop only.

``mode=fixed`` (the default) reads every row, applies dependencies transitively (a question counts only when it
and all its ancestors are answered "yes"), and computes category scores from all crops after dependencies. A
parent id that names no question of the item is ignored there (and counted in the notes). Every output names
the mode. L2 categories are the tuple's text before "(" ("entity - whole"), L1 the text before "-", as upstream.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import PIL.Image

from comat.core.errors import ComatError
from comat.core.io import atomic_write_bytes
from comat.evaluation.benchmark import Benchmark, Sample
from comat.evaluation.registry import register
from comat.generation.engine import load_image, png_bytes

CSV_NAME = "dpg_bench.csv"
COLUMNS = ("item_id", "text", "keywords", "proposition_id", "dependency", "category_broad", "category_detailed",
           "tuple", "question_natural_language")
REQUIRED = ("item_id", "text", "proposition_id", "dependency", "tuple", "question_natural_language")
CSV_FORM = f"a CSV with the header {','.join(COLUMNS)}"
MODES = ("faithful", "fixed")
GRID_CELLS = 4  # upstream's crop tuples: top-left, top-right, bottom-left, bottom-right


@dataclasses.dataclass(frozen=True)
class Proposition:
    """One CSV row: question ``qid`` of ``item_id`` and the ids it depends on (0 = none)."""

    item_id: str
    qid: int
    parents: tuple[int, ...]
    category: str  # L2, the tuple's text before "("
    question: str
    line: int


def l1_category(category: str) -> str:
    return category.split("-")[0].strip()


def _int(value: str, source: str, line: int, field: str) -> int:
    try:
        return int(value.strip())
    except ValueError:
        raise ComatError(f"{source}: line {line}: field '{field}' is {value!r}, not an integer "
                         f"(dependency: comma-separated ids, 0 = none); expected {CSV_FORM}") from None


def read_dpg_csv(text: str, source: str) -> tuple[list[Proposition], dict[str, str]]:
    """The rows as propositions in file order, and each item's prompt text (its first row's)."""
    reader = csv.DictReader(io.StringIO(text.removeprefix("\ufeff")))
    missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
    if missing:
        raise ComatError(f"{source}: line 1: missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)}; "
                         f"expected {CSV_FORM}")
    props, texts = [], {}
    for row in reader:
        line = reader.line_num
        short = [c for c in REQUIRED if row.get(c) is None]
        if short:
            raise ComatError(f"{source}: line {line}: no value for {', '.join(short)} (the row has too few fields); "
                             f"expected {CSV_FORM}")
        item = row["item_id"]
        parents = tuple(_int(d, source, line, "dependency") for d in row["dependency"].split(","))
        props.append(Proposition(item, _int(row["proposition_id"], source, line, "proposition_id"), parents,
                                 row["tuple"].split("(")[0].strip(), row["question_natural_language"], line))
        texts.setdefault(item, row["text"])
    if not props:
        raise ComatError(f"{source}: no question rows; expected {CSV_FORM}")
    return props, texts


def faithful_items(props: Sequence[Proposition]) -> dict[str, dict[int, Proposition]]:
    """Upstream ``prepare_dpg_data``: the first row is skipped; a row whose item differs from the previous row's
    starts that item afresh (a later block of an item replaces an earlier one); a repeated qid keeps its place."""
    items: dict[str, dict[int, Proposition]] = {}
    previous = None
    for k, p in enumerate(props):
        if k == 0:
            continue
        if p.item_id == previous:
            items[p.item_id][p.qid] = p
        else:
            items[p.item_id] = {p.qid: p}
        previous = p.item_id
    return items


def fixed_items(props: Sequence[Proposition]) -> dict[str, dict[int, Proposition]]:
    items: dict[str, dict[int, Proposition]] = {}
    for p in props:
        items.setdefault(p.item_id, {})[p.qid] = p
    return items


@dataclasses.dataclass
class ImageScore:
    score: float
    crop_scores: list[float]
    final: list[dict[int, float]]  # per crop, after dependencies
    category_scores: list[tuple[str, float]]


def _raw(questions: dict[int, Proposition], answers: dict[int, str]) -> dict[int, float]:
    return {qid: float(answers[qid] == "yes") for qid in questions}


def faithful_image_score(questions: dict[int, Proposition], crops: Sequence[dict[int, str]]) -> ImageScore:
    """Upstream ``compute_dpg_one_sample``, line for line; raises where it raises (KeyError: a parent that is not a
    question of the item; ZeroDivisionError: no questions), which upstream turns into a dropped image."""
    scores: dict[int, float] = {}
    crop_scores, finals = [], []
    for answers in crops:
        scores.update(_raw(questions, answers))
        raw_last = dict(scores)
        for qid, p in questions.items():  # one pass in file order, reading scores as they are being zeroed
            for parent in p.parents:
                if parent == 0:
                    continue
                if scores[parent] == 0:
                    scores[qid] = 0.0
                    break
        crop_scores.append(sum(scores.values()) / len(scores))
        finals.append(dict(scores))
    return ImageScore(sum(crop_scores) / len(crop_scores), crop_scores, finals,
                      [(questions[q].category, s) for q, s in raw_last.items()])


def transitive_scores(questions: dict[int, Proposition], raw: dict[int, float]) -> dict[int, float]:
    """1 for a question answered "yes" whose ancestors all are, else 0 (parents the item lacks are ignored)."""
    final: dict[int, float] = {}

    def resolve(qid: int, path: tuple[int, ...]) -> float:
        if qid in path:
            p = questions[qid]
            cycle = ", ".join(map(str, path[path.index(qid):] + (qid,)))
            raise ComatError(f"line {p.line}: item {p.item_id} has a dependency cycle through questions {cycle}; "
                             "fix the dependency column")
        if qid not in final:
            parents = [d for d in questions[qid].parents if d != 0 and d in questions]
            final[qid] = raw[qid] if all(resolve(d, path + (qid,)) == 1.0 for d in parents) else 0.0
        return final[qid]

    return {qid: resolve(qid, ()) for qid in questions}


def fixed_image_score(questions: dict[int, Proposition], crops: Sequence[dict[int, str]]) -> ImageScore:
    """Transitive dependencies on every crop; categories from every crop's final scores."""
    finals = [transitive_scores(questions, _raw(questions, answers)) for answers in crops]
    crop_scores = [sum(f.values()) / len(f) for f in finals]
    return ImageScore(sum(crop_scores) / len(crop_scores), crop_scores, finals,
                      [(questions[q].category, s) for f in finals for q, s in f.items()])


def dpg_summary(records: Sequence[dict]) -> dict[str, Any]:
    """DPG-Bench x 100 over the scored images, and the L1/L2 category scores (x 100) from their category scores."""
    scored = [r for r in records if r["score"] is not None]
    l2: dict[str, list[float]] = defaultdict(list)
    for r in scored:
        for cat, s in r["category_scores"]:
            l2[cat].append(s)
    l1: dict[str, list[float]] = defaultdict(list)
    for cat in sorted(l2):
        l1[l1_category(cat)] += l2[cat]
    pct = lambda xs: 100 * statistics.fmean(xs) if xs else float("nan")  # noqa: E731
    return {
        "dpg_score": pct([r["score"] for r in scored]),
        "n_scored": len(scored),
        "n_dropped": len(records) - len(scored),
        "dropped": {r["id"]: r["dropped"] for r in records if r["score"] is None},
        "l1": {c: pct(v) for c, v in sorted(l1.items())},
        "l2": {c: pct(v) for c, v in sorted(l2.items())},
        "questions_l1": {c: len(v) for c, v in sorted(l1.items())},
        "questions_l2": {c: len(v) for c, v in sorted(l2.items())},
    }


def grid_image(paths: Sequence[Path]) -> PIL.Image.Image:
    """Upstream's 2x2 layout: image j at crop tuple j (row-major); cells without an image stay black."""
    images = [load_image(p) for p in paths]
    w, h = images[0].size
    grid = PIL.Image.new("RGB", (2 * w, 2 * h))
    for j, im in enumerate(images):
        grid.paste(im, ((j % 2) * w, (j // 2) * h))
    return grid


# -- the toy world ----------------------------------------------------------------------------------------

def toy_item_rows(item: str, spec) -> list[dict[str, str]]:
    """DPG-style rows for one dense toy prompt (a ``comat.toy.prompts.PromptSpec``): an entity question per object,
    an attribute question per stated attribute (depending on its entity) and a relation question (depending on
    both entities), in the toy VQA's question language; proposition ids count from 1 in that order."""
    from comat.toy.prompts import Mention

    rows: list[dict[str, str]] = []

    def add(broad: str, detailed: str, args: Sequence[str], question: str, parents: Sequence[int]) -> int:
        rows.append({"item_id": item, "text": spec.text, "keywords": ", ".join(args),
                     "proposition_id": str(len(rows) + 1), "dependency": ",".join(map(str, parents)),
                     "category_broad": broad, "category_detailed": detailed,
                     "tuple": f"{broad} - {detailed} ({', '.join(args)})", "question_natural_language": question})
        return len(rows)

    entity = [add("entity", "whole", [m.shape], f"is there {Mention(m.shape).text}?", [0]) for m in spec.mentions]
    for k, m in enumerate(spec.mentions):
        for attr in ("color", "texture", "size"):
            value = getattr(m, attr)
            if value:
                add("attribute", attr, [m.shape, value], f"is the {m.shape} {value}?", [entity[k]])
    if spec.relation:
        phrase, a, b = spec.relation
        sa, sb = spec.mentions[a].shape, spec.mentions[b].shape
        add("relation", "spatial", [sa, sb, phrase], f"is the {sa} {phrase} the {sb}?", [entity[a], entity[b]])
    return rows


def toy_rows() -> list[dict[str, str]]:
    """The toy DPG-Bench: the dense toy prompts (the toy "complex" eval prompts, three objects and a relation)."""
    from comat.toy.prompts import prompt_specs

    specs = prompt_specs("complex", "eval")
    return [row for i, spec in enumerate(specs) for row in toy_item_rows(f"toy_complex_{i:03d}", spec)]


def toy_csv() -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(toy_rows())
    return buf.getvalue()


@register
class DpgBench(Benchmark):
    name = "dpg-bench"

    def __init__(self, protocol, **kwargs):
        super().__init__(protocol, **kwargs)
        self.mode = self.option("mode", "fixed", MODES)
        self.grids = self.option("grids", True)
        if protocol.images_per_prompt > GRID_CELLS:
            raise ComatError(f"dpg-bench scores at most {GRID_CELLS} images per prompt (a 2x2 grid), got "
                             f"{protocol.images_per_prompt}; pass --images-per-prompt 4 or fewer")
        self.notes = [
            f"scoring mode: {self.mode} ("
            + ("upstream quirks kept: first CSV row skipped, an image whose question depends on it dropped, "
               "one-pass dependencies in file order, L1/L2 from the last crop's raw answers" if self.mode == "faithful"
               else "transitive dependencies, every CSV row, L1/L2 from all crops after dependencies") + ")"]
        self.items: dict[str, dict[int, Proposition]] = {}

    def samples(self) -> list[Sample]:
        if self.toy:
            text, source = toy_csv(), "toy DPG-Bench CSV"
            self.data_records.append({"name": "toy dpg_bench.csv (generated by comat_benchmarks.dpg_bench.toy_csv)",
                                      "sha256": hashlib.sha256(text.encode()).hexdigest()})
        else:
            got = self.fetch(CSV_NAME)
            source = str(got.path)
            try:
                text = got.path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise ComatError(f"{got.path}: not UTF-8 text; expected {CSV_FORM}") from None
            if not got.pinned:
                self.notes.append(f"{CSV_NAME} has no pinned sha256 (it was not available when the protocol was "
                                  f"written): scored unverified, sha256 {got.sha256}")
        props, texts = read_dpg_csv(text, source)
        self._note_data_quirks(props)
        self.items = (faithful_items if self.mode == "faithful" else fixed_items)(props)
        if self.mode == "fixed":  # find dependency cycles now, not after generation
            try:
                for questions in self.items.values():
                    transitive_scores(questions, dict.fromkeys(questions, 1.0))
            except ComatError as e:
                raise ComatError(f"{source}: {e}") from None
        prompts = (None if self.toy else self._prompt_files(list(texts))) or texts
        category = "complex" if self.toy else "dpg"
        return [Sample(item, prompts[item], category) for item in texts]

    def _prompt_files(self, items: list[str]) -> dict[str, str] | None:
        """Upstream generates from ``prompts/<item_id>.txt``; when ``--data`` is a directory holding that folder
        its texts are the prompts (recorded with a digest), otherwise the CSV's ``text`` column is."""
        folder = self.data_dir / "prompts" if self.data_dir is not None and self.data_dir.is_dir() else None
        if folder is None or not folder.is_dir():
            self.notes.append(f"prompts: the text column of {CSV_NAME}")
            return None
        missing = [i for i in items if not (folder / f"{i}.txt").is_file()]
        if missing:
            raise ComatError(f"{folder}: no prompt file {missing[0]}.txt ({len(missing)} items of {CSV_NAME} have "
                             "none); pass the upstream dpg_bench/prompts folder or remove it to use the CSV's text column")
        prompts = {i: (folder / f"{i}.txt").read_text(encoding="utf-8").strip() for i in items}
        digest = hashlib.sha256("".join(f"{i}\t{t}\n" for i, t in sorted(prompts.items())).encode()).hexdigest()
        self.data_records.append({"name": "prompts/<item_id>.txt", "path": str(folder), "sha256_of_texts": digest})
        self.notes.append(f"prompts: {folder}/<item_id>.txt")
        return prompts

    def _note_data_quirks(self, props: Sequence[Proposition]) -> None:
        qids: dict[str, set[int]] = defaultdict(set)
        for p in props:
            qids[p.item_id].add(p.qid)
        repeated = len(props) - sum(len(v) for v in qids.values())
        if repeated:
            self.notes.append(f"{repeated} rows repeat an (item_id, proposition_id) pair; the later row is used")
        dangling = sum(any(d != 0 and d not in qids[p.item_id] for d in p.parents) for p in props)
        if dangling and self.mode == "fixed":
            self.notes.append(f"{dangling} questions depend on ids their item does not have; those parents are ignored")

    def score(self, samples: Sequence[Sample], images: Sequence[Sequence[Path]], judges) -> list[dict]:
        flat = [(k, j, qid) for k, (s, paths) in enumerate(zip(samples, images))
                for j in range(len(paths)) for qid in self.items.get(s.id, {})]
        answers = judges.answer([images[k][j] for k, j, _ in flat],
                                [self.items[samples[k].id][qid].question for k, _, qid in flat])
        crops: list[list[dict[int, str]]] = [[{} for _ in paths] for paths in images]
        for (k, j, qid), a in zip(flat, answers):
            crops[k][j][qid] = a
        scorer = faithful_image_score if self.mode == "faithful" else fixed_image_score
        records = []
        for k, s in enumerate(samples):
            questions = self.items.get(s.id, {})
            record: dict[str, Any] = {"id": s.id, "category": s.category, "prompt": s.prompt, "mode": self.mode,
                                      "seeds": self.protocol.seeds(), "images": [str(p) for p in images[k]]}
            try:
                result = scorer(questions, crops[k])
            except (KeyError, ZeroDivisionError) as e:  # faithful mode only: upstream drops this image
                reason = (f"depends on question {e}, which upstream skipped or the item lacks"
                          if isinstance(e, KeyError) else "no questions (upstream skipped its only row)")
                records.append({**record, "score": None, "dropped": reason})
                continue
            record.update(score=result.score, crop_scores=result.crop_scores, category_scores=result.category_scores)
            record["questions"] = [
                {"proposition_id": qid, "dependency": list(p.parents), "category": p.category, "question": p.question,
                 "answers": [c[qid] for c in crops[k]], "scores": [f[qid] for f in result.final]}
                for qid, p in questions.items()]
            records.append(record)
        return records

    def aggregate(self, records: Sequence[dict]) -> tuple[dict, list[dict]]:
        summary = {"mode": self.mode, **dpg_summary(records)}
        if summary["n_dropped"]:
            self.notes.append(f"{summary['n_dropped']} images dropped from the mean as upstream drops them "
                              f"(faithful mode): {', '.join(list(summary['dropped'])[:5])}")
        over = {"over": "images", "mode": self.mode}
        rows = [{"metric": "DPG-Bench", "score": summary["dpg_score"], "n": summary["n_scored"], **over}]
        rows += [{"metric": f"L1 {c}", "score": v, "n": summary["questions_l1"][c], **over, "over": "questions"}
                 for c, v in summary["l1"].items()]
        rows += [{"metric": f"L2 {c}", "score": v, "n": summary["questions_l2"][c], **over, "over": "questions"}
                 for c, v in summary["l2"].items()]
        return summary, rows

    def write_outputs(self, out: Path, samples: Sequence[Sample], images: Sequence[Sequence[Path]]) -> dict[str, Path]:
        """``<out>/grids/<item_id>.png``: the 2x2 grids upstream's scorer reads (``--option grids=false``: none)."""
        if not self.grids:
            return {}
        folder = Path(out) / "grids"
        for s, paths in zip(samples, images):
            atomic_write_bytes(folder / f"{s.id}.png", png_bytes(grid_image(paths)))
        return {"grids": folder}
