"""``comat report <run>``: one Markdown page for a run directory, with its figures as PNG.

Everything is found by globbing, not by assuming the layout of ``comat ablate``, ``comat demo`` or ``comat eval``:

- tables: every ``*.md`` with a sibling ``*.csv``. Summary tables (an ablation matrix, the demo's comparison) are
  inlined with per-category bars from their CSV; the per-evaluation tables they summarise are inlined folded.
- training logs: every ``log.csv`` in a ``train/`` directory or in a training directory that an ablation cell's
  ``cell.json`` names (cells whose configs resolve alike share one, under ``trained/``) (``comat train``'s ``_Log``:
  ``step`` plus every logged term), drawn as curves, one figure per top-level directory of the run (a shared training
  run in the figure of each matrix that used it), one line per cell/seed.
- evaluations: every ``*.samples.jsonl`` whose records are per-image (``id``, ``seed``, ``prompt``, ``image``). The
  evaluation's own ``manifest.json`` (or the ablation cell's ``cell.json``) tells whether a LoRA was applied; each
  fine-tuned evaluation is paired with the nearest base evaluation of the same benchmark, image by image on
  (prompt id, image seed), and drawn as a grid of base | fine-tuned pairs, as in the paper's Figure 1.

Images live in the content-addressed cache, outside the run: their pixels are copied into the grid PNGs, and images
the cache no longer holds are drawn as placeholders and listed on the page.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

from comat.core.errors import ComatError
from comat.core.io import atomic_write_bytes, atomic_write_text

REPORT = "report.md"
FIGURES = "figures"
FIGURE_PREFIXES = ("curves-", "bars-", "grid-")  # what a rerun may replace in FIGURES; nothing else there is touched
MAX_PROMPTS = 8  # pairs per category in a grid
SMOOTH = 10  # steps in the moving average of the training curves (at most a tenth of the log: short runs stay raw)
LOG_SKIP = ("step", "sec")  # the x axis and the step time: everything else in log.csv is a logged term
# CSV columns that are counts or differences rather than a model's score: not drawn as bars.
NOT_SCORES = {"delta", "images", "prompts", "seeds", "failed"}
NOT_SCORE_SUFFIXES = ("_std", "_delta")
EVAL_KEYS = {"id", "seed", "prompt", "image"}  # what makes a JSONL record one image of an evaluation
# Grid layout (pixels). Tiles are at least MIN_TILE (toy images are 64 px: nearest-upscaled by an integer factor, as
# `comat toy render` does) and at most MAX_TILE (SD images are scaled down).
MIN_TILE, MAX_TILE = 128, 256
MARGIN, INNER, GUTTER = 8, 4, 12  # around the grid, between base and fine-tuned, between pairs
FONT_SIZE, LINE_H = 12, 15
CAPTION_LINES = 3
LABEL_H = LINE_H + 6  # a category's label above its row of pairs
HEADER_H = 2 * LINE_H + MARGIN  # "left: base ..." / "right: fine-tuned ..."
BACKGROUND, INK, PLACEHOLDER = (255, 255, 255), (20, 20, 20), (200, 200, 200)


@dataclasses.dataclass(frozen=True)
class Table:
    md: Path
    csv: Path
    title: str
    evaluation: bool  # one model's per-sample evaluation (summarised by the run's other tables, if any)


@dataclasses.dataclass(frozen=True)
class Evaluation:
    path: Path  # <benchmark>.samples.jsonl
    benchmark: str
    label: str
    base: bool | None  # None: neither a manifest nor a cell record says


@dataclasses.dataclass(frozen=True)
class Pair:
    id: str
    seed: int
    prompt: str
    base: str  # image paths
    tuned: str


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "run"


def _rel(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path, start)).as_posix()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ComatError(f"{path}: unreadable JSON ({e}); rerun the command that wrote it") from None


def read_records(path: Path) -> list[dict]:
    """A JSONL file; a bad line is named (comat.core.results.read_jsonl would only say that some line is bad)."""
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ComatError(f"{path}, line {n}: not JSON ({e.msg}); rerun the command that wrote it") from None
    return records


def _per_image(path: Path) -> bool:
    """Whether a JSONL file holds per-image evaluation records (judged by its first line: files can be large)."""
    with path.open(encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), None)
    try:
        return first is not None and EVAL_KEYS <= json.loads(first).keys()
    except (json.JSONDecodeError, AttributeError):
        return False


def read_evaluation(path: Path) -> list[dict]:
    records = read_records(path)
    for n, r in enumerate(records, 1):
        if missing := EVAL_KEYS - r.keys():
            raise ComatError(f"{path}, record {n}: no {', '.join(sorted(missing))}; per-image evaluation records "
                             f"need {', '.join(sorted(EVAL_KEYS))} (rerun the evaluation that wrote it)")
    return records


def _cell(directory: Path) -> str | None:
    """'<cell> seed <k>' for an ablation cell directory (its cell.json), else None."""
    record = directory / "cell.json"
    if not record.is_file():
        return None
    data = _read_json(record)
    return f"{data.get('cell', directory.parent.name)} seed {data.get('seed', directory.name)}"


# --- discovery ------------------------------------------------------------------------------------------------------
def _walk(run: Path, pattern: str, skip: Path) -> list[Path]:
    return sorted(p for p in run.rglob(pattern) if skip not in p.parents)


def find_tables(run: Path, skip: Path) -> list[Table]:
    tables = []
    for md in _walk(run, "*.md", skip):
        csv = md.with_suffix(".csv")
        if not csv.is_file():
            continue
        samples = md.with_suffix(".samples.jsonl")
        tables.append(Table(md, csv, _split_title(md)[0] or md.stem, samples.is_file() and _per_image(samples)))
    return tables


def _table_name(md: Path, run: Path) -> str:
    """The table's path under the run without its suffix; a table named after its folder (``ca-ac/ca-ac.md``, as
    ``comat ablate`` and ``comat demo`` write them) by the folder alone."""
    stem = md.with_suffix("")
    named_after_folder = stem.name == stem.parent.name and stem.parent != run
    return _rel(stem.parent if named_after_folder else stem, run)


def _split_title(md: Path) -> tuple[str | None, list[str]]:
    """A table page's '# title' and its other lines."""
    lines = md.read_text(encoding="utf-8").splitlines()
    at = next((i for i, line in enumerate(lines) if line.startswith("# ")), None)
    return (None if at is None else lines[at][2:].strip()), [line for i, line in enumerate(lines) if i != at]


def _locate(recorded: str, run: Path) -> Path | None:
    """A path a record holds (absolute, or relative to where the command ran) as it is found now: the run may have
    moved or the report be written from elsewhere, so the longest tail of the path that exists under the run counts."""
    path = Path(recorded)
    for candidate in [path] + [run.joinpath(*path.parts[k:]) for k in range(1, len(path.parts))]:
        if candidate.exists():
            return candidate.resolve()
    return None


def cell_trainings(run: Path, skip: Path) -> dict[Path, list[tuple[str, str]]]:
    """Training directory -> (top-level directory of the run, '<cell> seed <k>') of each ablation cell whose LoRA it
    trained."""
    users: dict[Path, list[tuple[str, str]]] = {}
    for record in _walk(run, "cell.json", skip):
        lora = _read_json(record).get("lora")
        if lora and (training := _locate(str(Path(lora).parent), run)) is not None:
            group = record.parent.relative_to(run).parts[0] if record.parent != run else run.name
            users.setdefault(training, []).append((group, _cell(record.parent) or ""))
    return users


def find_logs(run: Path, skip: Path, trainings: dict[Path, Any]) -> list[Path]:
    return [p for p in _walk(run, "log.csv", skip) if p.parent.name == "train" or p.parent.resolve() in trainings]


def find_evaluations(run: Path, skip: Path) -> list[Evaluation]:
    evaluations = []
    for path in _walk(run, "*.samples.jsonl", skip):
        if not _per_image(path):
            continue
        directory = path.parent
        manifest, cell = directory / "manifest.json", directory.parent / "cell.json"
        if manifest.is_file() and isinstance(model := _read_json(manifest).get("model"), dict):
            base = model.get("lora_sha256") is None  # what the evaluation itself recorded about its weights
        elif cell.is_file():
            base = _read_json(cell).get("lora") is None
        else:
            base = None
        label = _cell(directory.parent) or (_rel(directory, run) if directory != run else run.name)
        evaluations.append(Evaluation(path, path.name.removesuffix(".samples.jsonl"), label, base))
    return evaluations


def nearest_base(tuned: Evaluation, evaluations: Iterable[Evaluation]) -> Evaluation | None:
    """The base evaluation of the same benchmark sharing the longest directory prefix (the demo's base/ beside its
    comat/, an ablation's base cell in the same matrix); ties go to the first in path order."""
    candidates = [e for e in evaluations if e.base and e.benchmark == tuned.benchmark]
    return max(candidates, key=lambda e: len(Path(os.path.commonpath([e.path.parent, tuned.path.parent])).parts),
               default=None)  # max keeps the first of equals


def pair_images(base: list[dict], tuned: list[dict], per_category: int = MAX_PROMPTS) -> dict[str, list[Pair]]:
    """Category -> up to ``per_category`` prompts, each the tuned model's first image (in file order) whose
    (prompt id, image seed) the base evaluation also has, beside that base image. '' is the category of records
    without one."""
    by_key = {}
    for r in base:
        by_key.setdefault((str(r["id"]), int(r["seed"])), r)
    blocks: dict[str, list[Pair]] = {}
    for r in tuned:
        key = (str(r["id"]), int(r["seed"]))
        block = blocks.setdefault(str(r.get("category") or ""), [])
        if key not in by_key or len(block) >= per_category or any(p.id == key[0] for p in block):
            continue
        block.append(Pair(key[0], key[1], str(r["prompt"]), str(by_key[key]["image"]), str(r["image"])))
    return {c: pairs for c, pairs in blocks.items() if pairs}


# --- figures --------------------------------------------------------------------------------------------------------
def _png(fig: Figure, path: Path) -> Path:
    buf = io.BytesIO()
    # No software tag: the bytes depend on the inputs, not on the matplotlib version that drew them.
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return atomic_write_bytes(path, buf.getvalue())


def _read_log(path: Path) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ComatError(f"{path}: not a training log ({type(e).__name__}: {str(e).strip()}); "
                         "rerun `comat train` (resumes) to rewrite it") from None
    if "step" not in frame.columns:
        raise ComatError(f"{path}: no 'step' column (has {', '.join(map(str, frame.columns))}); a `comat train` "
                         "log.csv starts with step")
    return frame.apply(pd.to_numeric, errors="coerce").sort_values("step")


def training_curves(logs: dict[str, Path], title: str, path: Path) -> Path:
    """Every logged term against the step, one panel per term and one line per log (``label -> log.csv``): a
    trailing moving average (``SMOOTH`` steps, fewer on short logs) over the raw values drawn faint. Logs of one
    ablation cell share a colour, its seeds differ in line style."""
    frames = {label: _read_log(p) for label, p in logs.items()}
    terms = list(dict.fromkeys(c for f in frames.values() for c in f.columns if c not in LOG_SKIP))
    cols = min(3, len(terms)) or 1
    rows = math.ceil(len(terms) / cols) or 1
    legend_rows = math.ceil(len(frames) / 3)
    fig = Figure(figsize=(4.2 * cols, 2.9 * rows + 0.6 + 0.2 * legend_rows), layout="constrained")
    fig.suptitle(title)
    names = list(dict.fromkeys(label.split(" seed ")[0] for label in frames))
    palette = [f"C{i % 10}" for i in range(len(names))]
    styles = ("-", "--", ":", "-.")
    for k, term in enumerate(terms):
        ax = fig.add_subplot(rows, cols, k + 1)
        ax.set_title(term, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        seen: dict[str, int] = {}
        for label, frame in frames.items():
            if term not in frame.columns or frame[term].isna().all():
                continue
            name = label.split(" seed ")[0]
            color = palette[names.index(name)]
            index = seen.get(name, 0)  # the how-many-th seed of this cell in this panel
            seen[name] = index + 1
            style = styles[index % len(styles)]
            ax.plot(frame["step"], frame[term], color=color, alpha=0.25, linewidth=0.8)
            window = max(1, min(SMOOTH, len(frame) // 10))
            ax.plot(frame["step"], frame[term].rolling(window, min_periods=1).mean(), color=color,
                    linestyle=style, linewidth=1.4, label=label,
                    marker="o" if len(frame) == 1 else None)  # a one-step log has no line to draw
    # One legend under the panels: inside a panel, a matrix's cells times seeds would cover (and collapse) it.
    handles = {h.get_label(): h for ax in fig.axes for h in ax.get_lines() if not h.get_label().startswith("_")}
    fig.legend(handles.values(), handles.keys(), loc="outside lower center", fontsize=7, ncols=min(len(handles), 3) or 1)
    return _png(fig, path)


def bar_series(csv: Path) -> tuple[list[str], dict[str, list[float]], dict[str, list[float]]] | None:
    """Categories, scores per model and their std (where the CSV has ``<category>_std``) from a T2I-CompBench-like
    table: either a row per category with a column per model (``comat demo``; ``comat eval``) or a row per model
    with a column per category (``comat ablate``; only its measured rows). None for any other shape."""
    try:
        frame = pd.read_csv(csv)
    except pd.errors.EmptyDataError:  # a table without rows (a run whose every cell failed): nothing to draw
        return None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise ComatError(f"{csv}: not a CSV table ({str(e).strip()}); rerun the command that wrote it") from None

    def scores(columns: Iterable[str]) -> list[str]:
        return [c for c in columns if c not in NOT_SCORES and not c.endswith(NOT_SCORE_SUFFIXES)
                and pd.api.types.is_numeric_dtype(frame[c])]

    if "category" in frame.columns:
        categories = [str(c) for c in frame["category"]]
        series = {c: frame[c].tolist() for c in scores(frame.columns.drop("category"))}
        errors: dict[str, list[float]] = {}
    elif "row" in frame.columns:
        if "source" in frame.columns:
            frame = frame[frame["source"] == "measured"]
        categories = scores(frame.columns.drop(["row"] + (["source"] if "source" in frame.columns else [])))
        series = {str(r["row"]): [r[c] for c in categories] for _, r in frame.iterrows()}
        errors = {str(r["row"]): [r.get(f"{c}_std", math.nan) for c in categories] for _, r in frame.iterrows()}
    else:
        return None
    series = {k: [float(v) for v in vs] for k, vs in series.items() if not pd.isna(vs).all()}
    return (categories, series, errors) if categories and series else None


def category_bars(csv: Path, title: str, path: Path) -> Path | None:
    """Grouped bars: one group per category, one bar per model, the first model (the base row) first."""
    found = bar_series(csv)
    if found is None:
        return None
    categories, series, errors = found
    legend_rows = math.ceil(len(series) / 3)
    fig = Figure(figsize=(max(6.4, 0.35 * len(categories) * (len(series) + 1) + 1.5), 3.4 + 0.2 * legend_rows),
                 layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        xs = [c + (i - (len(series) - 1) / 2) * width for c in range(len(categories))]
        err = errors.get(name)
        ax.bar(xs, values, width, label=name, color=f"C{i % 10}",
               yerr=err if err and not pd.isna(err).all() else None, capsize=2)
    ax.set_xticks(range(len(categories)), categories, fontsize=8)
    ax.set_title(title, fontsize=10, wrap=True)
    fig.legend(loc="outside lower center", fontsize=7, ncols=min(len(series), 3))  # long row names: not over bars
    return _png(fig, path)


def _wrap(text: str, font, width: int, lines: int) -> list[str]:
    """Greedy word wrap by rendered width (textwrap counts characters, not pixels); the last kept line ends in an
    ellipsis when the text does not fit."""
    out: list[str] = []
    for word in text.split():
        if out and font.getlength(f"{out[-1]} {word}") <= width:
            out[-1] = f"{out[-1]} {word}"
        else:
            out.append(word)
    if len(out) > lines:
        out = out[:lines]
        while out[-1] and font.getlength(out[-1] + "…") > width:
            out[-1] = out[-1][:-1]
        out[-1] += "…"
    return out


def _tile_size(pairs: Iterable[Pair]) -> tuple[int, int]:
    for p in pairs:
        for image in (p.base, p.tuned):
            try:
                with Image.open(image) as im:
                    w, h = im.size
            except (OSError, UnidentifiedImageError):
                continue
            side = max(w, h)
            scale = math.ceil(MIN_TILE / side) if side < MIN_TILE else min(1.0, MAX_TILE / side)
            return max(1, round(w * scale)), max(1, round(h * scale))
    return MIN_TILE, MIN_TILE


def _tile(image: str, size: tuple[int, int]) -> Image.Image | None:
    try:
        with Image.open(image) as im:
            im = im.convert("RGB")
            resample = Image.Resampling.NEAREST if im.width <= size[0] else Image.Resampling.LANCZOS
            return im.resize(size, resample) if im.size != size else im.copy()
    except (OSError, UnidentifiedImageError):
        return None


def grid_size(tile: tuple[int, int], columns: int, blocks: int) -> tuple[int, int]:
    return (2 * MARGIN + columns * (2 * tile[0] + INNER) + (columns - 1) * GUTTER,
            HEADER_H + blocks * (LABEL_H + tile[1] + CAPTION_LINES * LINE_H) + MARGIN)


def image_grid(blocks: dict[str, list[Pair]], base_label: str, tuned_label: str, path: Path) -> list[str]:
    """Draw one row of base | fine-tuned pairs per category, each pair captioned with its (wrapped) prompt and image
    seed; write the PNG and return the image paths that could not be read (drawn as grey placeholders)."""
    font = ImageFont.load_default(size=FONT_SIZE)
    tile = _tile_size(p for pairs in blocks.values() for p in pairs)
    columns = max(len(pairs) for pairs in blocks.values())
    canvas = Image.new("RGB", grid_size(tile, columns, len(blocks)), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    text_w = canvas.width - 2 * MARGIN
    draw.text((MARGIN, MARGIN // 2), _wrap(f"left: {base_label}", font, text_w, 1)[0], fill=INK, font=font)
    draw.text((MARGIN, MARGIN // 2 + LINE_H), _wrap(f"right: {tuned_label}", font, text_w, 1)[0], fill=INK, font=font)
    missing = []
    y = HEADER_H
    for category, pairs in blocks.items():
        draw.text((MARGIN, y + 2), category or "all prompts", fill=INK, font=font)
        y += LABEL_H
        for k, pair in enumerate(pairs):
            x = MARGIN + k * (2 * tile[0] + INNER + GUTTER)
            for dx, image in ((0, pair.base), (tile[0] + INNER, pair.tuned)):
                pixels = _tile(image, tile)
                if pixels is None:
                    missing.append(image)
                    draw.rectangle((x + dx, y, x + dx + tile[0] - 1, y + tile[1] - 1), fill=PLACEHOLDER)
                    draw.text((x + dx + 4, y + 4), "missing", fill=INK, font=font)
                else:
                    canvas.paste(pixels, (x + dx, y))
            caption = _wrap(f"{pair.prompt} (seed {pair.seed})", font, 2 * tile[0] + INNER, CAPTION_LINES)
            for i, line in enumerate(caption):
                draw.text((x, y + tile[1] + 1 + i * LINE_H), line, fill=INK, font=font)
        y += tile[1] + CAPTION_LINES * LINE_H
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return missing


# --- the page -------------------------------------------------------------------------------------------------------
_LINK = re.compile(r"(\]\()([^)\s]+)(\))")


def _inline(table: Table, out: Path) -> str:
    """The table's Markdown without its title, headings demoted below the page's, relative links rebased to ``out``."""
    body = "\n".join(_split_title(table.md)[1]).strip()
    body = re.sub(r"^(#+) ", r"###\1 ", body, flags=re.M)

    def rebase(m: re.Match) -> str:
        target = m[2]
        if re.match(r"^([a-z][a-z0-9+.-]*:|/|#)", target):
            return m[0]
        return f"{m[1]}{_rel(table.md.parent / target, out)}{m[3]}"

    return _LINK.sub(rebase, body)


def _unique(name: str, taken: set[str]) -> str:
    stem, k = name, 2
    while name in taken:
        name, k = f"{stem}-{k}", k + 1
    taken.add(name)
    return name


def _log_groups(logs: list[Path], run: Path, trainings: dict[Path, list[tuple[str, str]]]
                ) -> dict[str, dict[str, Path]]:
    """Figure -> {line label -> log.csv}: the figure of each ablation matrix whose cells a log trained, labelled by
    cell and seed; any other log goes to its top-level directory of the run, labelled by its path under it."""
    groups: dict[str, dict[str, Path]] = {}
    for log in logs:
        parts = log.parent.parent.relative_to(run).parts
        group = parts[0] if parts else run.name
        users = trainings.get(log.parent.resolve()) or [
            (group, _cell(log.parent.parent) or "/".join(p for p in parts[1:] if p != "cells") or group)]
        for figure, label in users:
            groups.setdefault(figure, {})[label] = log
    return {figure: dict(sorted(members.items())) for figure, members in groups.items()}  # cells in order, seeds within


def write_report(run: Path, out: Path | None = None) -> dict[str, Any]:
    """Write ``out/report.md`` (default ``out`` = ``run``) and ``out/figures/*.png``; return the paths, the missing
    images and the notes on what could not be paired."""
    run = Path(run)
    if not run.is_dir():
        raise ComatError(f"run directory {run} does not exist; give a directory written by `comat ablate`, "
                         "`comat demo` or `comat eval --out`")
    out = Path(out) if out is not None else run
    figures = out / FIGURES
    tables = find_tables(run, figures)
    if not tables:
        raise ComatError(f"{run} holds no tables (a *.md with a sibling *.csv); point `comat report` at the --out "
                         "directory of `comat ablate`, `comat demo` or `comat eval`")
    taken: set[str] = set()
    written: list[Path] = []
    page = [f"# Report: {run.resolve().name}", ""]

    def figure(kind: str, name: str) -> Path:
        return figures / _unique(f"{kind}-{_slug(name)}.png", taken)

    summaries = [t for t in tables if not t.evaluation] or tables
    folded = [t for t in tables if t not in summaries]
    page += ["## Tables", ""]
    for t in summaries:
        page += [f"### {t.title}", "", f"[`{_rel(t.md, run)}`]({_rel(t.md, out)}) · [CSV]({_rel(t.csv, out)})", "",
                 _inline(t, out), ""]
        bars = category_bars(t.csv, t.title, figure("bars", _table_name(t.md, run)))
        if bars:
            written.append(bars)
            page += [f"![per-category scores: {t.title}]({_rel(bars, out)})", ""]
    if folded:
        page += ["### Per-evaluation tables", ""]
        for t in folded:
            page += [f"<details><summary>{_rel(t.md, run)}: {t.title}</summary>", "", _inline(t, out), "",
                     "</details>", ""]

    trainings = cell_trainings(run, figures)
    logs = find_logs(run, figures, trainings)
    if logs:
        page += ["## Training curves", "",
                 "Every term of each `log.csv` against the step; faint: raw, solid: trailing moving average over "
                 f"{SMOOTH} steps (a tenth of the log when shorter).", ""]
        for group, members in _log_groups(logs, run, trainings).items():
            path = training_curves(members, f"training: {group}", figure("curves", group))
            written.append(path)
            page += [f"### {group}", "", f"![training curves: {group}]({_rel(path, out)})", "",
                     "Logs: " + ", ".join(f"[{label}]({_rel(p, out)})" for label, p in members.items()), ""]

    evaluations = find_evaluations(run, figures)
    notes = [f"{_rel(e.path, run)}: neither a manifest.json beside it nor a cell.json above it says whether a LoRA "
             "was applied; not paired" for e in evaluations if e.base is None]
    missing: dict[str, list[str]] = {}
    grids = []
    for tuned in (e for e in evaluations if e.base is False):
        base = nearest_base(tuned, evaluations)
        if base is None:
            notes.append(f"{_rel(tuned.path, run)}: no base evaluation of {tuned.benchmark} in the run to compare with")
            continue
        blocks = pair_images(read_evaluation(base.path), read_evaluation(tuned.path))
        if not blocks:
            notes.append(f"{_rel(tuned.path, run)}: no (prompt id, image seed) in common with {_rel(base.path, run)}")
            continue
        path = figure("grid", _rel(tuned.path.parent, run) + "-" + tuned.benchmark)
        lost = image_grid(blocks, f"base: {base.label}", f"fine-tuned: {tuned.label}", path)
        written.append(path)
        grids.append((tuned, base, path, sum(len(p) for p in blocks.values()), lost))
        if lost:
            missing[_rel(path, out)] = lost
    if grids:
        page += ["## Image grids", "",
                 f"Up to {MAX_PROMPTS} prompts per category: the base model's image (left of each pair) beside the "
                 "fine-tuned model's (right) for the same prompt id and image seed.", ""]
        for tuned, base, path, count, lost in grids:
            page += [f"### {tuned.label} vs {base.label} ({tuned.benchmark})", "",
                     f"![{tuned.label} vs {base.label}]({_rel(path, out)})", "",
                     f"{count} pairs from [{_rel(base.path, run)}]({_rel(base.path, out)}) and "
                     f"[{_rel(tuned.path, run)}]({_rel(tuned.path, out)})"
                     + (f"; {len(lost)} images missing (grey)" if lost else "") + ".", ""]
    if missing:
        page += ["## Missing images", "",
                 "These images are no longer in the image cache (drawn grey in the grids). Rerunning the evaluation "
                 "that made them (`comat eval`, `comat ablate` or `comat demo` with the same arguments) regenerates "
                 "only what is missing.", ""]
        for grid, paths in missing.items():
            page += [f"- {grid}: {len(paths)} missing: " + ", ".join(f"`{p}`" for p in paths)]
        page.append("")
    if notes:
        page += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]

    for stale in sorted(figures.glob("*.png")) if figures.is_dir() else ():
        if stale.name.startswith(FIGURE_PREFIXES) and stale not in written:
            stale.unlink()  # a figure of an earlier report whose input is gone
    report = atomic_write_text(out / REPORT, "\n".join(page))
    return {"report": report, "figures": written, "tables": [t.md for t in tables], "missing": missing, "notes": notes}
