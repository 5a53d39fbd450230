"""Diagnostic (session 7): share of 48 fresh samples of one prompt judged fully right by toy/vqa (DDIM 25, guidance 6,
seeds 1000+), base then each LoRA. Usage: python one_prompt.py PROMPT [LORA...]"""
import sys, torch
from comat.toy.eval_zoo import ZooEvalConfig, sample_images
from comat.toy.prompts import parse_prompt
from comat.judges.vqa import VqaJudge
from comat.models.t2i import load_t2i
prompt = sys.argv[1]
spec = parse_prompt(prompt)
cfg = ZooEvalConfig(images_per_prompt=48, seed=1000)
vqa = VqaJudge.load("comat/toy/zoo/vqa")
for lora in [None] + sys.argv[2:]:
    imgs = sample_images(load_t2i("toy", lora=lora), [prompt], cfg)
    ok = torch.ones(len(imgs), dtype=torch.bool)
    for m in spec.mentions:
        ok &= vqa.yes_probability(imgs, [m.text + "?"] * len(imgs)) > 0.5
    print(lora, f"{ok.float().mean():.3f}", flush=True)
