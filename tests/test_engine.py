import subprocess
from pathlib import Path

import pytest

from comat.core.errors import ComatError
from comat.generation.engine import GenerationEngine, ImageJob, SamplerSettings
from tests.tiny import run_ranks

JOBS = [ImageJob(p, s) for p in ("a red circle", "a blue square", "a green cross") for s in (0, 1)]
FAST = SamplerSettings(steps=2, guidance=3.0, scheduler="ddim")


def _engine(model, cache, **kw):
    return GenerationEngine(str(model), sampler=kw.pop("sampler", FAST), batch_size=kw.pop("batch_size", 4),
                            device="cpu", cache=cache, **kw)


def test_cache_key_changes_exactly_with_what_affects_the_image(tiny_sd_dir, tmp_path):
    e = _engine(tiny_sd_dir, tmp_path)
    job = ImageJob("a red circle", 0)
    same = _engine(tiny_sd_dir, tmp_path, batch_size=1)  # batching does not change images
    assert e.key(job) == same.key(job)
    assert e.key(job) != e.key(ImageJob("a red circle", 1))
    assert e.key(job) != e.key(ImageJob("a red circle ", 0))
    for sampler in (SamplerSettings(steps=3, guidance=3.0, scheduler="ddim"), SamplerSettings(steps=2, guidance=4.0, scheduler="ddim"),
                    SamplerSettings(steps=2, guidance=3.0, scheduler="ddpm"), SamplerSettings(steps=2, guidance=3.0, scheduler="ddim", resolution=64)):
        assert _engine(tiny_sd_dir, tmp_path, sampler=sampler).key(job) != e.key(job)
    # a weight change is a new model, even at the same path
    weights = next(Path(tiny_sd_dir).glob("unet/*.safetensors"))
    copy = tmp_path / "model"
    subprocess.run(["cp", "-r", str(tiny_sd_dir), str(copy)], check=True)
    assert _engine(copy, tmp_path).key(job) == e.key(job)  # the same files elsewhere: the same images
    data = bytearray((copy / weights.relative_to(tiny_sd_dir)).read_bytes())
    data[-1] ^= 1
    (copy / weights.relative_to(tiny_sd_dir)).write_bytes(bytes(data))
    assert _engine(copy, tmp_path).identity["model_sha256"] != e.identity["model_sha256"]


def test_second_run_generates_nothing_and_batching_does_not_change_images(tiny_sd_dir, tmp_path):
    e = _engine(tiny_sd_dir, tmp_path / "a")
    paths = e.generate(JOBS)
    assert e.generated == 6 and all(p.is_file() for p in paths)
    again = _engine(tiny_sd_dir, tmp_path / "a")
    assert again.generate(JOBS) == paths and again.generated == 0 and again._pipe is None  # no pipeline even loaded
    one_by_one = _engine(tiny_sd_dir, tmp_path / "b", batch_size=1)
    for p, q in zip(paths, one_by_one.generate(JOBS)):
        assert p.name == q.name


def test_missing_images_are_regenerated(tiny_sd_dir, tmp_path):
    e = _engine(tiny_sd_dir, tmp_path)
    paths = e.generate(JOBS)
    paths[3].unlink()
    again = _engine(tiny_sd_dir, tmp_path)
    again.generate(JOBS)
    assert again.generated == 1 and paths[3].is_file()


def test_inference_methods_are_refused_plainly(tiny_sd_dir, tmp_path):
    with pytest.raises(ComatError, match="cannot be sampled yet"):
        _engine(tiny_sd_dir, tmp_path, method="conform")
    with pytest.raises(ComatError, match="unknown scheduler"):
        SamplerSettings(scheduler="heun2")


_SHARD_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from comat.generation.engine import GenerationEngine, ImageJob, SamplerSettings
jobs = [ImageJob(p, s) for p in ("a red circle", "a blue square", "a green cross") for s in (0, 1)]
e = GenerationEngine(sys.argv[1], sampler=SamplerSettings(steps=2, guidance=3.0, scheduler="ddim"), batch_size=2,
                     device="cpu", cache=__import__("pathlib").Path(sys.argv[2]))
paths = e.generate(jobs)
print("GENERATED", e.generated)
"""


def test_two_processes_make_the_same_images_as_one(tiny_sd_dir, tmp_path):
    single = GenerationEngine(str(tiny_sd_dir), sampler=FAST, batch_size=2, device="cpu", cache=tmp_path / "one")
    reference = {p.name: p.read_bytes() for p in single.generate(JOBS)}
    outs = run_ranks(_SHARD_SCRIPT, str(tiny_sd_dir), str(tmp_path / "two"))
    generated = [int(o.split("GENERATED")[1].split()[0]) for o in outs]
    assert sorted(generated) == [2, 4]  # three batches of two, dealt round-robin
    shard = {p.name: p.read_bytes() for p in (tmp_path / "two" / "images").rglob("*.png")}
    assert shard == reference
