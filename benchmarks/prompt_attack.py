"""Prompt attack (Du et al., "Stable Diffusion is Unstable", NeurIPS 2023): data, class subset,
the success-rate run (``comat attack``) and its table beside the CoMat paper's rows.

Data: upstream's ``imageNet_short_prompt.csv`` ("a photo of a {class} and a") and ``imageNet_long_prompt.csv`` (one
descriptive sentence per class), columns ``prompt,label,classname``, 1,000 ImageNet classes. Each (class, seed)
is one attack sample; the CoMat paper runs 20 per class. As upstream, a sample whose clean image the classifier
already gets wrong is skipped ("skip this text") and counted apart; the success rate is over the attacked samples.

The zero-shot classifier ranks the distinct class names (998: "missile" and "sunglasses" are listed twice upstream,
which made the twin of the true class an unbeatable rival of identical score).

Toy world: the classes are the toy shapes; short prompts "a photo of a {shape} and a", long prompts one fully
described shape ("a small striped red circle"). The candidate tokens are the words of the toy training prompts:
the toy text encoder only ever saw those, every other row of its 49,408-token table is untrained initialisation,
and an attack through such rows would measure noise in unused weights rather than the model.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from comat.core.errors import ComatError
from comat.evaluation.attack import (
    AttackSettings,
    PromptAttacker,
    ZeroShotClassifier,
    attack_succeeded,
    class_in_text,
    class_margin,
    vocabulary,
)
from comat.evaluation.benchmark import Benchmark, Sample
from comat.evaluation.registry import register
from comat.generation.engine import ImageJob, load_image
from comat.judges.panel import Judges

KINDS = ("short", "long")
FILES = {"short": "imageNet_short_prompt.csv", "long": "imageNet_long_prompt.csv"}
COLUMNS = ("prompt", "label", "classname")
PAPER_SOURCE = "CoMat paper (arXiv 2404.03653), SD1.5 on ImageNet prompts"
PAPER_ROWS = {"SD1.5": (49.1, 51.1), "CoMat-SD1.5": (46.8, 50.4)}  # attack success rate %, short / long
# CLIP's 80 ImageNet prompt templates (Radford et al. 2021), the ensemble upstream's classifier averages.
OPENAI_IMAGENET_TEMPLATES = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.",
    "a photo of a {}.", "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.",
    "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.",
    "itap of a {}.", "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}.",
)


def toy_prompt_words() -> list[str]:
    """Every word a toy prompt can hold (the grammar's vocabulary; the same 36 words as all training prompts),
    without drawing the prompt sets, which takes seconds."""
    from comat.toy.prompts import COLORS, RELATIONS, SHAPES, SIZES, TEXTURES, Mention

    plurals = [Mention(s, count=2).text.split()[-1] for s in SHAPES]
    relations = [w for r in RELATIONS for w in r.split()]
    return sorted({*SHAPES, *plurals, *COLORS, *TEXTURES, *SIZES, *relations, "a", "an", "two", "three", "and"})


def read_prompt_csv(path: Path) -> list[dict[str, Any]]:
    """Rows of an upstream prompt file: ``prompt`` (text), ``label`` (int), ``classname`` (text)."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or ())]
            if missing:
                raise ComatError(f"{path}: missing column {', '.join(repr(c) for c in missing)}; expected the header "
                                 f"{','.join(COLUMNS)}")
            rows = []
            for line, row in enumerate(reader, start=2):
                try:
                    label = int(row["label"])
                except (TypeError, ValueError):
                    raise ComatError(f"{path}, line {line}: label {row['label']!r} is not an integer; expected "
                                     f"{','.join(COLUMNS)} rows") from None
                if not (row["prompt"] or "").strip() or not (row["classname"] or "").strip():
                    raise ComatError(f"{path}, line {line}: empty prompt or classname; expected "
                                     f"{','.join(COLUMNS)} rows")
                rows.append({"prompt": row["prompt"], "label": label, "classname": row["classname"].strip()})
    except UnicodeDecodeError:
        raise ComatError(f"{path}: not UTF-8 text; expected a CSV with the header {','.join(COLUMNS)}") from None
    return rows


@register
class PromptAttack(Benchmark):
    """``samples``: one per (kind, class). ``score``: zero-shot top-1 of each image and the success rule; under
    ``comat eval attack`` (no attack) that is how often the unattacked prompt already fails."""

    name = "attack"
    title = "prompt attack"

    def __init__(self, protocol, *, data: Path | None = None, unpinned: bool = False):
        super().__init__(protocol, data=data, unpinned=unpinned)
        self.run_label = "this run"
        self._classes: list[str] | None = None
        self._classifier: tuple[str, ZeroShotClassifier] | None = None

    # -- data ------------------------------------------------------------------------------------------

    def _rows(self) -> dict[str, list[dict[str, Any]]]:
        if self.toy:
            from comat.toy.prompts import COLORS, SHAPES, SIZES, TEXTURES, Mention

            long = [Mention(s, color=COLORS[i % len(COLORS)], texture=TEXTURES[1 + i % 2], size=SIZES[i % 2]).text
                    for i, s in enumerate(SHAPES)]
            short = [f"a photo of a {s} and a" for s in SHAPES]
            return {kind: [{"prompt": p, "label": i, "classname": s} for i, (s, p) in enumerate(zip(SHAPES, texts))]
                    for kind, texts in (("short", short), ("long", long))}
        return {kind: read_prompt_csv(self.fetch(FILES[kind]).path) for kind in KINDS}

    def samples(self) -> list[Sample]:
        rows = self._rows()
        names: dict[int, str] = {}
        for kind, kind_rows in rows.items():
            for r in kind_rows:
                if names.setdefault(r["label"], r["classname"]) != r["classname"]:
                    raise ComatError(f"{FILES.get(kind, kind)}: label {r['label']} is '{r['classname']}' here but "
                                     f"'{names[r['label']]}' in the other file; the files must share their classes")
        self._classes = list(dict.fromkeys(names[label] for label in sorted(names)))
        index = {name: i for i, name in enumerate(self._classes)}
        return [Sample(id=f"{kind}-{r['label']:04d}", prompt=r["prompt"], category=kind,
                       meta={"label": r["label"], "classname": r["classname"], "class_index": index[r["classname"]]})
                for kind in KINDS for r in rows[kind]]

    @property
    def classes(self) -> list[str]:
        """The classifier's classes: the distinct class names in label order."""
        if self._classes is None:
            self.samples()
        return self._classes

    def select(self, samples: list[Sample], kinds: Sequence[str], classes: Sequence[str],
               num_classes: int | None) -> tuple[list[Sample], list[int]]:
        """The samples of ``kinds`` and of the chosen classes (names or labels; then ``num_classes`` evenly spaced
        ones); returns them with the chosen labels."""
        unknown = [k for k in kinds if k not in KINDS]
        if unknown or not kinds:
            raise ComatError(f"unknown prompt kind {', '.join(unknown) or '(none)'}; use {' and/or '.join(KINDS)}")
        by_name = {s.meta["classname"].lower(): s.meta["label"] for s in samples}
        labels = sorted({s.meta["label"] for s in samples})
        chosen = []
        for c in classes:
            label = int(c) if str(c).strip().isdigit() else by_name.get(str(c).strip().lower())
            if label is None or label not in labels:
                raise ComatError(f"unknown class {c!r}; give a class name from the prompt files or a label "
                                 f"{labels[0]}..{labels[-1]}")
            chosen.append(label)
        pool = sorted(set(chosen)) if classes else labels
        if num_classes is not None:
            if not 0 < num_classes <= len(pool):
                raise ComatError(f"num_classes={num_classes} is not between 1 and the {len(pool)} classes available")
            pool = [pool[i * len(pool) // num_classes] for i in range(num_classes)]
        keep = set(pool)
        return [s for s in samples if s.category in kinds and s.meta["label"] in keep], pool

    # -- classifier ------------------------------------------------------------------------------------

    def class_texts(self) -> list[list[str]]:
        if self.toy:
            from comat.toy.prompts import COLORS, Mention

            return [[Mention(name, color=c).text for c in (None, *COLORS)] for name in self.classes]
        return [[t.format(name) for t in OPENAI_IMAGENET_TEMPLATES] for name in self.classes]

    def classifier(self, judges: Judges) -> tuple[str, ZeroShotClassifier]:
        """The zero-shot classifier on the ``clip`` judge, with an id of its class texts for the judge cache."""
        if self._classifier is None:
            texts = self.class_texts()
            digest = hashlib.sha256(json.dumps(texts).encode()).hexdigest()[:16]
            self._classifier = (f"zero-shot:{digest}", ZeroShotClassifier(judges.model("clip"), texts))
        return self._classifier

    def candidates(self, tokenizer) -> torch.Tensor:
        if self.protocol.options.get("candidates") == "toy-words":
            return vocabulary(tokenizer, toy_prompt_words())
        return vocabulary(tokenizer)

    # -- the attack ------------------------------------------------------------------------------------

    def run(self, samples: Sequence[Sample], ctx) -> list[dict] | None:
        """With option ``attack`` (``comat attack``): attack every (class, seed) sample whose clean image is
        classified right. Without it (``comat eval attack``): score the clean images only."""
        kinds = _listed(self.option("kinds", list(KINDS)))
        classes = _listed(self.option("classes", []))
        num_classes = self.option("num_classes", None)
        samples, labels = self.select(list(samples), kinds, classes, int(num_classes) if num_classes else None)
        self.run_label = ctx.cfg.model + (" + LoRA" if ctx.cfg.ckpt else "")
        if not self.option("attack", False):
            return super().run(samples, ctx)
        settings = _settings(self.protocol)
        engine = ctx.engine
        clean_images = self.generate(samples, ctx)
        ctx.judges_device = str(engine.execution_device)  # the attack's gradient flows through the classifier
        judges = ctx.judges
        clean = self.score(samples, clean_images, judges)
        expanded = [(s, seed) for s in samples for seed in self.protocol.seeds()]
        todo = [(s, seed, r) for (s, seed), r in zip(expanded, clean) if r["predicted"] == s.meta["classname"]]

        candidates = self.candidates(engine.pipe.tokenizer)
        attacker = PromptAttacker(engine.pipe, self.classifier(judges)[1], settings, candidates)
        attack_start = time.perf_counter()
        results = []
        batch_size = ctx.cfg.batch_size
        for i in range(0, len(todo), batch_size):
            batch = todo[i : i + batch_size]
            results += attacker.run([s.prompt for s, _, _ in batch], [s.meta["class_index"] for s, _, _ in batch],
                                    [seed for _, seed, _ in batch])
        attack_seconds = time.perf_counter() - attack_start

        finals = [Sample(id=s.id, prompt=res.final_prompt, category=s.category, meta={**s.meta, "seed": seed})
                  for (s, seed, _), res in zip(todo, results)]
        final_paths = engine.generate([ImageJob(f.prompt, f.meta["seed"]) for f in finals])
        scored = {r["id"]: (r, res) for r, res in zip(self.score(finals, [[p] for p in final_paths], judges), results)}
        records = []
        for r in clean:
            base = {k: r[k] for k in ("id", "category", "label", "classname", "prompt", "seed")}
            base |= {"clean_predicted": r["predicted"], "clean_margin": r["margin"]}
            if r["id"] not in scored:
                records.append({**base, "skipped": True, "success": None, "score": None})
                continue
            final, res = scored[r["id"]]
            records.append({**base, "skipped": False, "attack_tokens": res.token_ids, "attack_text": res.attack_text,
                            "final_prompt": res.final_prompt, "prompt_truncated": res.truncated,
                            "tokens_roundtrip": res.roundtrip, "predicted": final["predicted"],
                            "margin": final["margin"], "class_in_text": final["class_in_text"],
                            "success": final["success"], "score": final["score"], "loss_first": res.losses[0],
                            "loss_last": res.losses[-1]})
        self.protocol_extra = {
            "samples_per_class": self.protocol.images_per_prompt,
            "partial": bool(classes or num_classes or set(kinds) != set(KINDS)), "kinds": ",".join(kinds),
            "classes": len(labels), "relaxation": "straight-through" if settings.straight_through else "soft",
            "candidates_size": int(attacker.candidates.numel())}
        self.manifest_extra = {"classes": labels, "settings": dataclasses.asdict(settings),
                               "counts": {"samples": len(records), "attacked": len(todo)},
                               "seconds": {"attack": round(attack_seconds, 2)}}
        return records

    # -- scoring ---------------------------------------------------------------------------------------

    def score(self, samples: Sequence[Sample], images: Sequence[Sequence[Path]], judges) -> list[dict]:
        """One record per image: the classifier's top-1 and margin (true class minus best other), the success rule.
        Image ``j`` of a sample has seed ``meta['seed']`` when given, else the protocol's seed + ``j``."""
        task, classifier = self.classifier(judges)

        def compute(paths: list[Path], questions: list[str]) -> list[dict]:
            logits = classifier.classify([load_image(p) for p in paths])
            labels = torch.tensor([int(q) for q in questions], device=logits.device)
            margins = class_margin(logits, labels).tolist()
            return [{"top1": int(t), "margin": round(m, 4)} for t, m in zip(logits.argmax(1).tolist(), margins)]

        flat = [(s, j, p) for s, paths in zip(samples, images) for j, p in enumerate(paths)]
        answers = judges.cached("clip", task, [p for _, _, p in flat], [str(s.meta["class_index"]) for s, _, _ in flat],
                                compute, batch_size=32)
        records = []
        for (s, j, _), a in zip(flat, answers):
            seed = s.meta.get("seed", self.protocol.seed + j)
            success = attack_succeeded(s.meta["classname"], s.prompt, a["top1"], s.meta["class_index"])
            records.append({"id": f"{s.id}/seed{seed}", "category": s.category, "label": s.meta["label"],
                            "classname": s.meta["classname"], "prompt": s.prompt, "seed": seed,
                            "predicted": self.classes[a["top1"]], "margin": a["margin"],
                            "class_in_text": class_in_text(s.meta["classname"], s.prompt), "success": success,
                            "score": float(success)})
        return records

    def aggregate(self, records: Sequence[dict]) -> tuple[dict, list[dict]]:
        """Success rate (%) per kind over the attacked samples; the paper's rows beside."""
        counts, rates = {}, {}
        for kind in KINDS:
            mine = [r for r in records if r["category"] == kind]
            attacked = [r for r in mine if not r.get("skipped")]
            wins = sum(bool(r["success"]) for r in attacked)
            rates[kind] = round(100.0 * wins / len(attacked), 2) if attacked else None
            counts[kind] = {"samples": len(mine), "attacked": len(attacked), "successes": wins,
                            "skipped_clean_misclassified": len(mine) - len(attacked)}
        if not any(r.get("skipped") is not None for r in records):
            self.notes.append("no attack was run (comat eval): the rate is how often the clean prompt's image is "
                              "already not classified as its class; run `comat attack` for the attack")
        rows = [{"model": self.run_label, "short %": rates["short"], "long %": rates["long"],
                 "short n": counts["short"]["attacked"], "long n": counts["long"]["attacked"],
                 "source": f"this run ({self.protocol.world} world)"}]
        rows += [{"model": name, "short %": short, "long %": long, "source": PAPER_SOURCE}
                 for name, (short, long) in PAPER_ROWS.items()]
        return {"success_rate": rates, "counts": counts}, rows


# ------------------------------------------------------------------------------------------------- run


def _settings(protocol) -> AttackSettings:
    o, s = protocol.options, protocol.sampler
    return AttackSettings(tokens=int(o["tokens"]), iterations=int(o["iterations"]), lr=float(o["lr"]),
                          tau=float(o["tau"]), straight_through=bool(o["straight_through"]), kappa=float(o["kappa"]),
                          steps=s.steps, guidance=s.guidance, scheduler=s.scheduler, resolution=s.resolution)


def _listed(value: Any) -> list[str]:
    """A list option, from code (a list) or the command line (comma-separated)."""
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [v for v in str(value).split(",") if v]
