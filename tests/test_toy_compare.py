import json
import shutil

import torch

from comat.models.t2i import LoraSpec, add_lora, load_t2i, save_lora
from comat.toy.eval_zoo import ZooEvalConfig, compare_t2i
from comat.toy.prompts import COLORS, SHAPES
from tests.tiny import save_tiny_grounding_dino, save_tiny_vqa


def test_compare_scores_base_and_lora_on_the_same_prompts_and_seeds(tiny_sd_dir, tmp_path):
    zoo = tmp_path / "zoo"
    shutil.copytree(tiny_sd_dir, zoo / "t2i")
    words = ["a", "an", *SHAPES, *COLORS, "."]
    save_tiny_vqa(zoo / "vqa", words)
    save_tiny_grounding_dino(zoo / "grounding_dino", words)
    pipe = load_t2i(zoo / "t2i")
    for p in add_lora(pipe.unet, LoraSpec(rank=2, alpha=2)):
        torch.nn.init.normal_(p, std=0.5)  # a LoRA that changes the images
    save_lora(pipe, tmp_path / "lora")
    cfg = ZooEvalConfig(images_per_prompt=1, sample_steps=2)
    result = compare_t2i(tmp_path / "lora", cfg, zoo)
    rows = {r["metric"]: r for r in result["rows"]}
    assert {"t2i.single_object", "t2i.color_binding", "t2i.missing_object_rate"} <= set(rows)
    for r in rows.values():
        assert abs(r["tuned"] - r["base"] - r["delta"]) < 1e-12 and 0 <= r["base"] <= 1
    assert any(r["delta"] != 0 for r in rows.values())  # the LoRA's images were scored, not the base's twice
    again = compare_t2i(tmp_path / "lora", cfg, zoo)
    assert again["rows"] == result["rows"]  # fixed seeds: the comparison is reproducible


def test_eval_zoo_reports_every_bar_on_the_committed_zoo(tmp_path):
    from comat.models.hub import TOY_ZOO
    from comat.toy.eval_zoo import BARS, evaluate_zoo, write_report

    result = evaluate_zoo(TOY_ZOO, ZooEvalConfig(judge_scenes=8, images_per_prompt=1, sample_steps=2))
    assert [b["metric"] for b in result["bars"]] == [name for name, _, _ in BARS]
    assert all(0 <= b["value"] <= 1 for b in result["bars"])
    assert result["training"]["t2i"]["steps"] and result["training"]["t2i"]["train_seconds"]
    profile = {"models": {"t2i": {"seconds_per_step": 0.5, "steps": 10, "seconds": 5}}, "total_seconds": 5,
               "wall_seconds": 5, "protocol": {"jobs": 2, "threads": 1, "warmup_steps": 25, "timed_steps": 50, "seed": 0,
                                                "machine": {"cpu": "Test CPU", "cores": 2}},
               "environment": {"torch": "x"}}
    (tmp_path / "pretrain-profile.json").write_text(json.dumps(profile))
    json_path, md_path = write_report(result, tmp_path)
    text = md_path.read_text()
    assert "| vqa_accuracy | >= 0.97 |" in text and "total:" in text and json_path.is_file()
    assert "- t2i: 0.500 s/step x 10 steps = 5 s" in text and "wall time with `--jobs 2`: 0.00 h" in text and "seed 0, Test CPU (2 cores);" in text
    # the sampler is read from the shipped scheduler, not assumed
    assert "sampler=DDIM (v_prediction, trailing spacing, zero terminal SNR)" in text


def test_single_object_breakdown_asks_about_each_attribute_alone():
    from comat.toy.eval_zoo import single_object_by_attribute
    from comat.toy.prompts import Mention

    class DotBlindJudge:  # accepts every question except those about dots
        def __init__(self):
            self.asked = []

        def yes_probability(self, images, questions):
            self.asked += questions
            return torch.tensor([0.0 if "dotted" in q else 1.0 for q in questions])

    mentions = [Mention("triangle", "red", "dotted", "big"), Mention("circle", None, "striped"),
                Mention("square", "blue", "dotted"), Mention("cross")]
    judge = DotBlindJudge()
    result = single_object_by_attribute(judge, torch.zeros(4, 3, 8, 8), mentions)
    assert result == {"t2i.single_object.color.blue": 1.0, "t2i.single_object.color.red": 1.0,
                      "t2i.single_object.texture.dotted": 0.0, "t2i.single_object.texture.striped": 1.0,
                      "t2i.single_object.size.big": 1.0}
    # the size question leaves the dots out, so a sample that misses its texture can still pass on size
    assert "a big triangle?" in judge.asked and "a dotted triangle?" in judge.asked and "a red triangle?" in judge.asked
