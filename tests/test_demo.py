import csv
import json
from pathlib import Path

from comat.evaluation.runner import EvalConfig
from comat.experiments.demo import demo
from tests.test_train import WORDS, base_sets, fake_segmenter, judges  # noqa: F401 - fixtures
from tests.tiny import save_tiny_clip, save_tiny_vqa


def test_demo_trains_then_compares_base_and_tuned_on_toy_prompts(tiny_sd_dir, judges, fake_segmenter, tmp_path):
    refs = {"vqa": str(save_tiny_vqa(tmp_path / "vqa", WORDS)), "detector": str(judges / "gd"),
            "clip": str(save_tiny_clip(tmp_path / "clip"))}
    out = tmp_path / "demo"
    result = demo(out, overrides=tuple(base_sets(tiny_sd_dir, judges)), device="cpu", log=lambda m: None,
                  eval_config=EvalConfig(model=str(tiny_sd_dir), world="toy", judges=refs, limit=1, images_per_prompt=1,
                                         device="cpu"))
    rows = list(csv.DictReader((out / "demo.csv").open()))
    assert [r["category"] for r in rows] == ["color", "shape", "texture", "spatial", "non_spatial", "complex"]
    for r in rows:
        assert abs(float(r["comat"]) - float(r["base"]) - float(r["delta"])) < 1e-9
    assert (out / "base" / "t2i-compbench.md").is_file() and (out / "comat" / "t2i-compbench.md").is_file()
    assert "comat train --preset toy" in (out / "demo.md").read_text()
    assert not (out / "demo.samples.jsonl").exists()  # the per-image records are base/'s and comat/'s, not an empty file
    # the tuned model's images are its own: the LoRA hash is part of every cache key
    models = {k: json.loads(Path(p).read_text())["model"] for k, p in result["manifest"]["evaluations"].items()}
    assert models["base"]["lora_sha256"] is None and len(models["comat"]["lora_sha256"]) == 64
