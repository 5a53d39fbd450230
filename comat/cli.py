"""The ``comat`` command line (Typer). Options shared by several commands are defined once, below."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler

from comat.core.config import load_config
from comat.core.errors import ComatError

app = typer.Typer(
    name="comat",
    help="Train, evaluate and ablate text-to-image alignment methods (CoMat and its peers).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
toy_app = typer.Typer(help="The toy world: procedural scenes and the small model zoo that runs everything on a CPU.")
app.add_typer(toy_app, name="toy")
bench_app = typer.Typer(help="Speed figures: each prints a ratio measured within one run.")
app.add_typer(bench_app, name="bench")
err = Console(stderr=True)

# --- shared options ---------------------------------------------------------------------------------
ModelOpt = Annotated[
    Optional[str],
    typer.Option("--model", "-m", help="Base model: 'toy' (default), a hub id, or a local diffusers pipeline directory."),
]
CkptOpt = Annotated[Optional[Path], typer.Option("--ckpt", help="LoRA directory written by `comat train`.")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output directory (created if missing).")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Base random seed.")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="TOML or YAML config file.")]
SetOpt = Annotated[
    Optional[list[str]], typer.Option("--set", "-s", help="Override one config field: field=value (repeatable).")
]
ThreadsOpt = Annotated[Optional[int], typer.Option(
    "--threads", help="Torch threads of this process (default: $COMAT_THREADS, else every usable core).")]
ProcessesOpt = Annotated[Optional[int], typer.Option(
    "--processes", help="CPU processes that share image generation when no launcher started several (default: "
                        "$COMAT_PROCESSES, else every usable core); results do not depend on it.")]

C = TypeVar("C")


def resolve_config(cls: type[C], config: Optional[Path], sets: Optional[list[str]], **flags) -> C:
    """Defaults < config file < --set overrides < explicit command-line flags."""
    cfg = load_config(cls, config, sets or ())
    return dataclasses.replace(cfg, **{k: v for k, v in flags.items() if v is not None})


def say(msg: str) -> None:
    err.print(msg, highlight=False, soft_wrap=True)


def use_threads(threads: Optional[int]) -> None:
    from comat.core.runtime import configure_threads

    configure_threads(threads)


# --- commands ---------------------------------------------------------------------------------------
@app.command()
def generate(
    prompt: Annotated[Optional[list[str]], typer.Option("--prompt", "-p", help="A prompt (repeatable).")] = None,
    prompts: Annotated[Optional[Path], typer.Option("--prompts", help="Text file, one prompt per line.")] = None,
    model: ModelOpt = None,
    ckpt: CkptOpt = None,
    out: OutOpt = Path("out/generate"),
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    steps: Annotated[Optional[int], typer.Option(help="Sampler steps.")] = None,
    guidance: Annotated[Optional[float], typer.Option(help="Classifier-free guidance scale.")] = None,
    images_per_prompt: Annotated[Optional[int], typer.Option("--images-per-prompt", "-n")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    threads: ThreadsOpt = None,
) -> None:
    """Generate images for prompts with a base model and an optional LoRA."""
    from comat.generation.generate import GenerateConfig, generate as run, read_prompt_file

    use_threads(threads)
    listed = list(prompt or []) + (read_prompt_file(prompts) if prompts else [])
    cfg = resolve_config(
        GenerateConfig, config, set_, model=model, ckpt=str(ckpt) if ckpt else None, seed=seed, device=device,
        steps=steps, guidance=guidance, images_per_prompt=images_per_prompt, prompts=listed or None,
    )
    paths = run(cfg, out)
    err.print(f"wrote {len(paths)} images and config.resolved.yaml to {out}")


@app.command()
def train(
    preset: Annotated[Optional[str], typer.Option("--preset", help="Starting config: toy, sd15 or sdxl (paper Table 8).")] = None,
    model: ModelOpt = None,
    out: OutOpt = Path("out/train"),
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Optimiser steps (with --profile: steps per mode).")] = None,
    resume: Annotated[
        Optional[bool],
        typer.Option("--resume/--no-resume", help="Resume from OUT/checkpoint (default: whenever one exists)."),
    ] = None,
    profile: Annotated[
        bool, typer.Option("--profile", help="Time a few steps with selective vs all-layer attention capture.")
    ] = False,
    method: Annotated[str, typer.Option("--method", help="Fine-tuning method.")] = "comat",
    threads: ThreadsOpt = None,
) -> None:
    """Fine-tune a model with CoMat (concept activation, fidelity preservation, attribute concentration)."""
    from accelerate import PartialState

    from comat.methods.comat.config import load_train_config
    from comat.train.trainer import profile as run_profile, train as run_train

    use_threads(threads)

    flags = {"model": model, "seed": seed, "steps": None if profile else steps}
    overrides = tuple(set_ or ()) + tuple(f"{k}={v}" for k, v in flags.items() if v is not None)
    cfg = load_train_config(preset, config, overrides)
    if profile:
        run_profile(cfg, out, steps=steps or 3, device=device or "auto", log=say)
        err.print(f"wrote {out / 'profile.json'}")
        return
    lora = run_train(cfg, out, method=method, device=device or "auto", resume=resume, progress=True, log=say)
    if PartialState().is_main_process:  # under accelerate launch / torchrun every rank gets here
        err.print(f"wrote {lora} (diffusers LoRA), {out / 'log.csv'} and checkpoints to {out}")


def _pairs(items: Optional[list[str]], flag: str) -> dict[str, str]:
    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ComatError(f"{flag} {item!r} is not KEY=VALUE; write e.g. {flag} vqa=Salesforce/blip-vqa-base")
        out[key.strip()] = value.strip()
    return out


@app.command("eval")
def evaluate(
    benchmark: Annotated[str, typer.Argument(help="Benchmark name, e.g. t2i-compbench (see benchmarks/protocols.yaml).")],
    model: ModelOpt = None,
    ckpt: CkptOpt = None,
    out: OutOpt = Path("out/eval"),
    seed: Annotated[Optional[int], typer.Option("--seed", help="First image seed (default: the protocol's; recorded).")] = None,
    device: DeviceOpt = None,
    data: Annotated[Optional[Path], typer.Option(help="The official data file or its directory (default: download the pinned file).")] = None,
    unpinned: Annotated[bool, typer.Option("--unpinned", help="Score data whose sha256 is not the pinned one (recorded).")] = False,
    category: Annotated[Optional[list[str]], typer.Option("--category", help="Only this category (repeatable).")] = None,
    limit: Annotated[Optional[int], typer.Option(help="At most this many prompts per category (a labelled partial run).")] = None,
    images_per_prompt: Annotated[Optional[int], typer.Option("--images-per-prompt", "-n", help="Override the protocol's.")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Images per pipeline call.")] = None,
    judge: Annotated[Optional[list[str]], typer.Option("--judge", help="ROLE=MODEL: replace a judge (repeatable).")] = None,
    option: Annotated[Optional[list[str]], typer.Option("--option", help="KEY=VALUE benchmark option, e.g. mode=fixed.")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    threads: ThreadsOpt = None,
    processes: ProcessesOpt = None,
) -> None:
    """Generate and score a benchmark for a checkpoint; a second run of the same checkpoint generates nothing."""
    from comat.evaluation.runner import EvalConfig, evaluate as run

    use_threads(threads)
    cfg = resolve_config(
        EvalConfig, config, set_, model=model, ckpt=str(ckpt) if ckpt else None, device=device,
        data=str(data) if data else None, unpinned=unpinned or None, categories=category or None, limit=limit,
        images_per_prompt=images_per_prompt, seed=seed, batch_size=batch_size, judges=_pairs(judge, "--judge") or None,
        options=_pairs(option, "--option") or None, processes=processes,
    )
    _print_run(run(benchmark, cfg, out))


def _print_run(result: dict) -> None:
    """The table with its protocol line, the notes, what was generated and where the outputs went."""
    from comat.core.results import markdown_table, protocol_line

    if not result:  # a process that only shared the generation
        return
    say(markdown_table(result["rows"]) + protocol_line(result["manifest"]["protocol"]))
    for note in result["notes"]:
        say(f"- {note}")
    counts, seconds = result["manifest"]["counts"], result["manifest"]["seconds"]
    made = (f"generated {counts['generated']} of {counts['images']} images (the rest were cached); "
            if "generated" in counts else "")
    say(f"{made}{seconds['total']} s; wrote {', '.join(str(p) for p in result['files'].values())}")


@app.command()
def demo(
    out: OutOpt = Path("out/demo"),
    device: DeviceOpt = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Training steps (default: 180, which keeps the demo within 15 min on 2 CPU cores).")] = None,
    limit: Annotated[int, typer.Option(help="Prompts per T2I-CompBench category in the evaluations.")] = 20,
    set_: SetOpt = None,
    threads: ThreadsOpt = None,
    processes: ProcessesOpt = None,
) -> None:
    """Train CoMat on the toy world and compare base and fine-tuned on toy T2I-CompBench (the README's main job)."""
    from comat.core.results import markdown_table
    from comat.evaluation.runner import EvalConfig
    from comat.experiments.demo import demo as run

    use_threads(threads)
    overrides = tuple(set_ or ()) + ((f"steps={steps}",) if steps else ())
    result = run(out, overrides=overrides, eval_config=EvalConfig(limit=limit, device=device or "auto", processes=processes),
                 device=device or "auto", log=say)
    say(markdown_table(result["rows"]))
    say(f"wrote {result['files']['markdown']} and {result['files']['csv']}")


@app.command()
def ablate(
    matrix: Annotated[str, typer.Argument(help="Ablation matrix: ca-ac, fid, captioner, stop-grad, grad-steps (ablations/*.yaml).")],
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Preset: toy (default), sd15 or sdxl.")] = None,
    out: OutOpt = Path("out/ablate"),
    seed: Annotated[Optional[int], typer.Option("--seed", help="First training seed: cells train with seed..seed+seeds-1.")] = None,
    device: DeviceOpt = None,
    seeds: Annotated[Optional[int], typer.Option(help="Training seeds per cell (mean and std over them).")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Training steps per cell (default: the preset's).")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Prompts per benchmark category.")] = None,
    shard: Annotated[Optional[str], typer.Option(help="i/n: run every n-th cell from i (one process per GPU); rerun without it for the table.")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    threads: ThreadsOpt = None,
    processes: ProcessesOpt = None,
) -> None:
    """Train and evaluate every cell of an ablation matrix (resumable); write the paper-shaped table."""
    from comat.core.results import markdown_table
    from comat.experiments.ablate import AblateConfig, run_ablation

    use_threads(threads)
    cfg = resolve_config(AblateConfig, config, None, model=model, first_seed=seed, seeds=seeds, steps=steps, limit=limit, shard=shard,
                         device=device, processes=processes, set=tuple(set_) if set_ else None)
    result = run_ablation(matrix, cfg, out, log=say)
    if result:
        say(markdown_table(result["markdown"]) + "\n".join(result["agreement"]))
        say(f"wrote {result['files']['markdown']} and {result['files']['csv']}")


CaptionerModelOpt = Annotated[
    Optional[str],
    typer.Option("--captioner-model", "--model", "-m",
                 help="Checkpoint of the --captioner kind: a hub id or a directory (default: the paper's)."),
]


@app.command()
def sensitivity(
    captioner: Annotated[Optional[str], typer.Option(
        help="A captioner kind, blip, git or llava (checkpoint: --captioner-model), or a toy captioner, toy/blip or "
             "toy/git. Default: toy/blip, with --data blip.")] = None,
    captioner_model: CaptionerModelOpt = None,
    data: Annotated[Optional[Path], typer.Option(
        help='JSONL test set, one {"image": PATH, "caption": TEXT} per line, image paths relative to the file '
             "(default: renders of toy eval prompts).")] = None,
    n: Annotated[Optional[int], typer.Option("--n", help="Toy world: number of scenes (default 300).")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Captions scored per captioner call.")] = None,
    out: OutOpt = Path("out/sensitivity"),
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    threads: ThreadsOpt = None,
) -> None:
    """Captioner sensitivity to attribute swaps, subject/object swaps and noun replacements (paper Table 7)."""
    from comat.evaluation.runner import EvalConfig, evaluate as run

    use_threads(threads)
    options = {"captioner": captioner, "captioner_model": captioner_model, "n": n}
    cfg = resolve_config(EvalConfig, config, set_, world="real" if data else "toy", data=str(data) if data else None,
                         batch_size=batch_size, seed=seed, device=device,
                         options={k: v for k, v in options.items() if v is not None} or None)
    _print_run(run("sensitivity", cfg, out))


@app.command()
def attack(
    model: ModelOpt = None,
    ckpt: CkptOpt = None,
    out: OutOpt = Path("out/attack"),
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    data: Annotated[Optional[Path], typer.Option(help="The upstream prompt CSVs or their directory (default: download the pinned files).")] = None,
    unpinned: Annotated[bool, typer.Option("--unpinned", help="Use CSVs whose sha256 is not the pinned one (recorded).")] = False,
    kind: Annotated[Optional[list[str]], typer.Option("--kind", help="short or long (repeatable; default both).")] = None,
    class_: Annotated[Optional[list[str]], typer.Option("--class", help="Only this class, by name or label (repeatable).")] = None,
    num_classes: Annotated[Optional[int], typer.Option("--num-classes", help="An evenly spaced subset of this many classes.")] = None,
    samples_per_class: Annotated[Optional[int], typer.Option("--samples-per-class", "-n", help="Seeds per class (paper: 20).")] = None,
    iterations: Annotated[Optional[int], typer.Option(help="Adam iterations per sample (protocol: 100).")] = None,
    tokens: Annotated[Optional[int], typer.Option(help="Appended token positions.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Sampler steps (a quick, labelled run).")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Samples attacked together.")] = None,
    judge: Annotated[Optional[list[str]], typer.Option("--judge", help="clip=MODEL: replace the classifier's CLIP.")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    threads: ThreadsOpt = None,
    processes: ProcessesOpt = None,
) -> None:
    """Gumbel-softmax prompt attack success rate on short and long prompts (Du et al. 2023)."""
    from comat.evaluation.runner import EvalConfig, evaluate as run

    use_threads(threads)
    options = {"attack": True, "kinds": kind, "classes": class_, "num_classes": num_classes, "iterations": iterations,
               "tokens": tokens}
    cfg = resolve_config(
        EvalConfig, config, set_, model=model, ckpt=str(ckpt) if ckpt else None, seed=seed, device=device,
        data=str(data) if data else None, unpinned=unpinned or None, images_per_prompt=samples_per_class,
        steps=steps, batch_size=batch_size, judges=_pairs(judge, "--judge") or None,
        options={k: v for k, v in options.items() if v is not None}, processes=processes,
    )
    _print_run(run("attack", cfg, out))


@app.command()
def report(
    run: Annotated[Path, typer.Argument(
        help="A run directory: the --out of `comat ablate`, `comat demo` or `comat eval`.")],
    out: OutOpt = None,  # type: ignore[assignment]  # None: the run directory itself
) -> None:
    """Gather the tables, plots and image grids of a run into one Markdown page: OUT/report.md and OUT/figures/*.png
    (OUT: the run directory unless given)."""
    from comat.experiments.report import write_report

    result = write_report(run, out)
    say(f"wrote {result['report']} ({len(result['tables'])} tables) and {len(result['figures'])} figures in "
        f"{result['report'].parent / 'figures'}")
    lost = len({p for paths in result["missing"].values() for p in paths})
    if lost:
        say(f"{lost} images are no longer in the image cache; they are drawn grey and listed in the report")


@toy_app.command("render")
def toy_render(
    out: OutOpt = Path("out/toy-render"),
    n: Annotated[int, typer.Option("--n", help="Number of scenes.")] = 16,
    seed: SeedOpt = None,
    category: Annotated[Optional[str], typer.Option(help="Prompt category (default: a mix).")] = None,
) -> None:
    """Write a grid of toy scenes with their prompts and ground truth."""
    from comat.toy.world import render_grid

    path = render_grid(out, n=n, seed=seed or 0, category=category)
    err.print(f"wrote {path}")


@toy_app.command("pretrain")
def toy_pretrain(
    only: Annotated[Optional[str], typer.Option(help="Train only this zoo model.")] = None,
    zoo: Annotated[Optional[Path], typer.Option(help="Zoo directory (default: the package's comat/toy/zoo).")] = None,
    work: Annotated[Path, typer.Option(help="Training checkpoints, for resuming.")] = Path("checkpoints/toy"),
    seed: SeedOpt = None,
    threads: Annotated[int, typer.Option(help="CPU threads for this process.")] = 1,
    max_minutes: Annotated[Optional[float], typer.Option(help="Stop after this long (checkpointed; rerun to resume).")] = None,
    force: Annotated[bool, typer.Option(help="Retrain models that are already in the zoo.")] = False,
    jobs: Annotated[int, typer.Option(help="Models trained at once, one process each (independent ones only).")] = 1,
    profile: Annotated[
        bool, typer.Option("--profile", help="Time a few steps of each recipe (--jobs at a time) and estimate the full "
                                             "pretraining time; writes OUT/pretrain-profile.json. Trains nothing.")
    ] = False,
    out: Annotated[Path, typer.Option(help="With --profile: where the profile goes.")] = Path("out/toy-pretrain"),
) -> None:
    """Train the toy model zoo in dependency order, resuming from the last checkpoint."""
    from comat.core.io import atomic_write_json
    from comat.models.hub import TOY_ZOO
    from comat.toy.pretrain import PretrainConfig, pretrain_zoo, profile_lines, profile_zoo
    from comat.toy.registry import RECIPES

    if only is not None and only not in RECIPES:
        raise ComatError(f"unknown toy model '{only}'; the zoo has {', '.join(RECIPES)}")
    if jobs < 1:
        raise ComatError(f"--jobs {jobs}: use 1 or more")
    recipes = [RECIPES[only]] if only else list(RECIPES.values())
    cfg = PretrainConfig(seed=seed or 0, threads=threads, max_minutes=max_minutes)
    if profile:
        result = profile_zoo(recipes, cfg, zoo=zoo or TOY_ZOO, jobs=jobs)
        err.print("\n".join(profile_lines(result)))
        err.print(f"wrote {atomic_write_json(out / 'pretrain-profile.json', result)}")
        return
    pretrain_zoo(recipes, cfg, zoo=zoo or TOY_ZOO, work=work, jobs=jobs, force=force, log=err.print)


@toy_app.command("eval-zoo")
def toy_eval_zoo(
    out: OutOpt = Path("out/toy-zoo"),
    zoo: Annotated[Optional[Path], typer.Option(help="Zoo directory (default: the package's comat/toy/zoo).")] = None,
    seed: SeedOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Measure the toy zoo's quality bars (judges against ground truth, the text-to-image model's failures)."""
    from comat.models.hub import TOY_ZOO
    from comat.toy.eval_zoo import ZooEvalConfig, evaluate_zoo, write_report

    cfg = resolve_config(ZooEvalConfig, config, set_, seed=seed)
    result = evaluate_zoo(zoo or TOY_ZOO, cfg)
    json_path, md_path = write_report(result, out)
    err.print(md_path.read_text())
    err.print(f"wrote {json_path} and {md_path}")


@toy_app.command("compare")
def toy_compare(
    ckpt: Annotated[Path, typer.Option("--ckpt", help="LoRA directory written by `comat train --preset toy`.")],
    out: OutOpt = Path("out/toy-compare"),
    seed: SeedOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    threads: ThreadsOpt = None,
) -> None:
    """Single-object fidelity, colour binding and missing objects of the base toy model beside a LoRA."""
    from comat.core.results import write_run
    from comat.toy.eval_zoo import ZooEvalConfig, compare_t2i

    use_threads(threads)
    result = compare_t2i(ckpt, resolve_config(ZooEvalConfig, config, set_, seed=seed))
    files = write_run(out, "compare", records=[], aggregate={r["metric"]: r for r in result["rows"]}, rows=result["rows"],
                      manifest={"protocol": result["protocol"], "environment": result["environment"]},
                      title="Toy text-to-image metrics: base vs LoRA")
    say(files["markdown"].read_text())


@bench_app.command("engine")
def bench_engine(
    model: ModelOpt = None,
    device: DeviceOpt = None,
    images: Annotated[int, typer.Option(help="Images per round and path.")] = 32,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 8,
    rounds: Annotated[int, typer.Option(help="Alternating rounds (direct, engine).")] = 3,
    threads: ThreadsOpt = None,
) -> None:
    """Generation through the engine (cache keys, PNG writes) against the bare diffusers pipeline."""
    from comat.experiments.perf import engine_overhead

    use_threads(threads)
    r = engine_overhead(model or "toy", images=images, batch_size=batch_size, rounds=rounds, device=device or "auto")
    say(f"direct pipeline {r['direct_images_per_s']:.2f} img/s, engine {r['engine_images_per_s']:.2f} img/s, "
        f"engine/direct time {r['engine_over_direct']:.3f} ({r['images']} images per path, batch {r['batch_size']}, "
        f"{r['sampler']}, model {r['model']})")


@bench_app.command("eval")
def bench_eval(
    benchmark: Annotated[str, typer.Argument(help="The benchmark to time.")] = "t2i-compbench",
    model: ModelOpt = None,
    limit: Annotated[int, typer.Option(help="Prompts per category (20: the evaluation of comat demo).")] = 20,
    threads: ThreadsOpt = None,
    processes: ProcessesOpt = None,
) -> None:
    """A CPU evaluation (generation and scoring, cold caches) at one thread, at the default threads and with worker
    processes, in one run."""
    from comat.core.results import markdown_table
    from comat.experiments.perf import eval_throughput

    use_threads(threads)
    r = eval_throughput(benchmark, model=model or "toy", limit=limit, processes=processes)
    say(markdown_table(r["rows"]) + f"{r['benchmark']} on {r['model']}, {r['limit']} prompts per category "
        f"({r['images']} images), cold image and judge caches, {r['cores']} usable cores")


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s", handlers=[RichHandler(console=err, show_path=False)])
    # Library chatter (progress bars, deprecation notes) would bury the tool's own output; set before they import.
    for var, value in (("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("DIFFUSERS_VERBOSITY", "error"), ("TRANSFORMERS_VERBOSITY", "error")):
        os.environ.setdefault(var, value)
    try:
        app()
    except ComatError as e:
        err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
