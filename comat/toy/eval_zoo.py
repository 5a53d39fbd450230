"""``comat toy eval-zoo``: measure the toy zoo against its quality bars and write ``zoo.json`` / ``zoo.md``.

Judges are checked against ground-truth renders; the text-to-image model is checked on its own samples
with those judges. The text-to-image bars are two-sided on purpose: the base model must draw single
objects well, yet still bind colours wrongly and drop objects, so that CoMat has something to fix.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from diffusers import DDIMScheduler

from comat.core.io import atomic_write_json, atomic_write_text
from comat.core.runtime import environment
from comat.judges.detector import Detector
from comat.judges.vqa import VqaJudge
from comat.models.captioners import load_captioner
from comat.models.segmenter import load_segmenter
from comat.models.t2i import load_lora, load_t2i
from comat.toy.pretrain import parallel_wall_seconds, profile_lines, read_training_record
from comat.toy.prompts import SHAPES, Mention, PromptSpec, prompt_specs
from comat.toy.quality import captioner_swap_accuracy, vqa_accuracy
from comat.toy.quality_vision import detector_recall, segmenter_miou
from comat.toy.registry import RECIPES

# (metric, comparison, threshold): the quality a zoo model must reach for the toy world to stand in for the real one.
BARS = [
    ("vqa_accuracy", ">=", 0.97),
    ("detector_recall", ">=", 0.95),
    ("segmenter_miou", ">=", 0.80),
    ("captioner_swap_accuracy.blip", ">=", 0.90),
    ("captioner_swap_accuracy.git", ">=", 0.90),
    ("t2i.single_object", ">=", 0.85),
    ("t2i.color_binding", "<=", 0.70),
    ("t2i.missing_object_rate", ">", 0.0),
]


@dataclasses.dataclass
class ZooEvalConfig:
    judge_scenes: int = 400  # held-out ground-truth renders per judge metric
    images_per_prompt: int = 4
    sample_steps: int = 25
    guidance: float = 4.0  # the toy t2i model's best single-object acceptance (docs/toy-zoo-guidance-texture-stage.md)
    seed: int = 0


@torch.no_grad()
def sample_images(pipe, prompts: list[str], cfg: ZooEvalConfig, batch: int = 64) -> torch.Tensor:
    """``images_per_prompt`` samples per prompt (DDIM, seed ``cfg.seed + j`` for the j-th), ``[N,3,H,W]`` in [0,1]."""
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    jobs = [(p, cfg.seed + j) for p in prompts for j in range(cfg.images_per_prompt)]
    out = []
    for i in range(0, len(jobs), batch):
        chunk = jobs[i : i + batch]
        generators = [torch.Generator().manual_seed(s) for _, s in chunk]
        out.append(pipe([p for p, _ in chunk], num_inference_steps=cfg.sample_steps, guidance_scale=cfg.guidance,
                        generator=generators, output_type="pt").images.cpu())
    return torch.cat(out)


def sampler_protocol(pipe) -> str:
    """How :func:`sample_images` samples ``pipe``: DDIM on the pipeline's own noise schedule and parametrisation."""
    c = pipe.scheduler.config
    zero_snr = ", zero terminal SNR" if c.get("rescale_betas_zero_snr") else ""
    return f"DDIM ({c.prediction_type}, {c.timestep_spacing} spacing{zero_snr})"


def _phrase_questions(spec: PromptSpec) -> list[str]:
    # T2I-CompBench's BLIP-VQA question: the noun phrase followed by "?".
    return [m.text + "?" for m in spec.mentions]


def single_object_by_attribute(vqa: VqaJudge, images: torch.Tensor, mentions: list[Mention]) -> dict[str, float]:
    """Which attribute single-object samples get wrong: for each sample whose prompt names a colour, texture or size,
    the judge is asked about the shape and that attribute alone ("a dotted triangle?"); acceptance per value."""
    attributes = ("color", "texture", "size")
    out = {}
    for kind in attributes:
        alone = {i: dataclasses.replace(m, **{k: None for k in attributes if k != kind})
                 for i, m in enumerate(mentions) if getattr(m, kind)}
        if not alone:
            continue
        ok = vqa.yes_probability(images[list(alone)], [m.text + "?" for m in alone.values()]) > 0.5
        for value in sorted({getattr(m, kind) for m in alone.values()}):
            hits = [bool(o) for m, o in zip(alone.values(), ok) if getattr(m, kind) == value]
            out[f"t2i.single_object.{kind}.{value}"] = sum(hits) / len(hits)
    return out


def t2i_metrics(pipe, vqa: VqaJudge, detector: Detector, cfg: ZooEvalConfig) -> dict[str, float]:
    """Single-object acceptance (overall and per attribute value), two-object colour binding, and the rate of prompted
    objects not drawn."""
    n = cfg.images_per_prompt
    single = prompt_specs("single", "eval")
    images = sample_images(pipe, [s.text for s in single], cfg)
    questions = [q for s in single for q in _phrase_questions(s) * n]
    single_ok = (vqa.yes_probability(images, questions) > 0.5).float().mean().item()
    by_attribute = single_object_by_attribute(vqa, images, [s.mentions[0] for s in single for _ in range(n)])

    color = prompt_specs("color", "eval")
    images = sample_images(pipe, [s.text for s in color], cfg)
    specs = [s for s in color for _ in range(n)]
    first = vqa.yes_probability(images, [_phrase_questions(s)[0] for s in specs]) > 0.5
    second = vqa.yes_probability(images, [_phrase_questions(s)[1] for s in specs]) > 0.5
    both = (first & second).float()
    unseen = torch.tensor([s.is_unseen() for s in specs])
    detections = detector.detect(list(images), list(SHAPES))
    prompted = [(found, m.shape) for s, dets in zip(specs, detections) for found in [{d[0] for d in dets}] for m in s.mentions]
    missing = sum(shape not in found for found, shape in prompted) / len(prompted)
    return {
        "t2i.single_object": single_ok,
        **by_attribute,
        "t2i.color_binding": both.mean().item(),
        "t2i.color_binding_seen": both[~unseen].mean().item(),
        "t2i.color_binding_unseen": both[unseen].mean().item(),
        "t2i.missing_object_rate": missing,
    }


def evaluate_zoo(zoo: Path, cfg: ZooEvalConfig) -> dict:
    ref = lambda name: str(zoo / name)  # noqa: E731 - the zoo is an ordinary model directory
    vqa = VqaJudge.load(ref("vqa"))
    detector = Detector.load(ref("grounding_dino"))
    metrics: dict[str, float] = {}
    vqa_result = vqa_accuracy(vqa, cfg.judge_scenes, cfg.seed)
    metrics["vqa_accuracy"] = vqa_result["accuracy"]
    metrics.update({f"vqa_accuracy.{k}": vqa_result[k] for k in ("yes_no", "attribute")})
    metrics.update({f"vqa_accuracy.{k}": v for k, v in vqa_result["per_kind"].items()})
    metrics["detector_recall"] = detector_recall(detector, cfg.judge_scenes, cfg.seed)
    metrics["segmenter_miou"] = segmenter_miou(
        load_segmenter(ref("grounding_dino"), ref("sam"), sam_type="custom"), cfg.judge_scenes, cfg.seed)
    for kind in ("blip", "git"):
        metrics[f"captioner_swap_accuracy.{kind}"] = captioner_swap_accuracy(
            load_captioner(kind, ref(kind)), cfg.judge_scenes, cfg.seed)
    pipe = load_t2i(ref("t2i"))
    metrics.update(t2i_metrics(pipe, vqa, detector, cfg))
    checks = {name: _passes(metrics[name], op, bar) for name, op, bar in BARS}
    training = {name: read_training_record(zoo, name) for name in sorted(p.name for p in zoo.iterdir() if p.is_dir())}
    return {
        "metrics": metrics,
        "bars": [{"metric": n, "op": op, "bar": b, "value": metrics[n], "pass": checks[n]} for n, op, b in BARS],
        "all_pass": all(checks.values()),
        "protocol": {**dataclasses.asdict(cfg), "sampler": sampler_protocol(pipe),
                     "judge_split": "eval renders (held-out seeds)",
                     "t2i_prompts": "toy eval split: single and color categories (seen + unseen combinations)"},
        "training": {k: {"steps": v.get("steps"), "train_seconds": v.get("train_seconds")} for k, v in training.items()},
        "environment": environment(),
    }


def compare_t2i(ckpt: Path, cfg: ZooEvalConfig, zoo: Path | None = None) -> dict:
    """The text-to-image metrics of the base toy model and of it with a LoRA (how ``comat toy compare`` measures a fine-tune)."""
    from comat.models.hub import TOY_ZOO

    zoo = zoo or TOY_ZOO
    vqa, detector = VqaJudge.load(str(zoo / "vqa")), Detector.load(str(zoo / "grounding_dino"))
    pipe = load_t2i(str(zoo / "t2i"))
    base = t2i_metrics(pipe, vqa, detector, cfg)
    load_lora(pipe, ckpt)  # the same pipeline, now with the adapter: one model load for both
    tuned = t2i_metrics(pipe, vqa, detector, cfg)
    rows = [{"metric": k, "base": base[k], "tuned": tuned[k], "delta": tuned[k] - base[k]} for k in base]
    protocol = {**dataclasses.asdict(cfg), "sampler": sampler_protocol(pipe), "lora": str(ckpt),
                "judges": "toy/vqa, toy/grounding_dino",
                "prompts": "toy eval split (held out from training): single and color categories"}
    return {"rows": rows, "protocol": protocol, "environment": environment()}


def _passes(value: float, op: str, bar: float) -> bool:
    return {">=": value >= bar, "<=": value <= bar, ">": value > bar}[op]


def write_report(result: dict, out: Path) -> tuple[Path, Path]:
    lines = ["# Toy zoo quality", "", "| metric | bar | value | pass |", "|---|---|---|---|"]
    lines += [f"| {b['metric']} | {b['op']} {b['bar']} | {b['value']:.4f} | {'yes' if b['pass'] else 'NO'} |"
              for b in result["bars"]]
    extra = {k: v for k, v in result["metrics"].items() if k not in {b["metric"] for b in result["bars"]}}
    lines += ["", "Other measurements:", ""] + [f"- {k}: {v:.4f}" for k, v in extra.items()]
    lines += ["", "Pretraining (steps; wall seconds of each single-threaded run, as recorded in its training.json):", ""]
    lines += [f"- {k}: {v['steps']} steps, {v['train_seconds']} s" for k, v in result["training"].items()]
    seconds = {k: v["train_seconds"] or 0 for k, v in result["training"].items()}
    in_order = {k: seconds[k] for k in RECIPES if k in seconds}  # the order pretrain_zoo starts them in
    two_jobs = parallel_wall_seconds(in_order, {k: r.requires for k, r in RECIPES.items()}, jobs=2)
    lines += [f"- total: {sum(seconds.values()) / 3600:.2f} h",
              f"- wall time with `comat toy pretrain --jobs 2` (these times, in the command's order): {two_jobs / 3600:.2f} h"]
    profile = out / "pretrain-profile.json"
    if profile.is_file():  # step times measured in one run, where the records above mix runs on busier machines
        lines += ["", f"Pretraining time estimated by `comat toy pretrain --profile` ({profile.name}):", ""]
        lines += profile_lines(json.loads(profile.read_text()))
    lines += ["", "Protocol: " + ", ".join(f"{k}={v}" for k, v in result["protocol"].items()),
              "", "Environment: " + ", ".join(f"{k} {v}" for k, v in result["environment"].items()), ""]
    return atomic_write_json(out / "zoo.json", result), atomic_write_text(out / "zoo.md", "\n".join(lines))
