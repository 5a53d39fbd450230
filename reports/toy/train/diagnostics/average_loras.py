"""Diagnostic (session 20): one LoRA whose update is the exact mean of several LoRAs' updates.

    python average_loras.py OUT LORA_DIR [LORA_DIR ...] [--scale S]

Each module's update of a LoRA is up @ down (scale 1: comat writes alpha = rank, and the file carries no alpha), so
concatenating the downs along the rank and the ups, divided by their number, along the rank gives
mean_i(up_i @ down_i) as one LoRA of rank n*r that `comat toy compare --ckpt OUT` loads like any other.
Averaging the factors themselves would not: (mean up) @ (mean down) has cross terms between runs. `--scale S`
multiplies the mean update by S (session 20's "x2", session 21's "x1.5")."""
import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

parser = argparse.ArgumentParser()
parser.add_argument("out", type=Path)
parser.add_argument("loras", nargs="+")
parser.add_argument("--scale", type=float, default=1.0)
args = parser.parse_args()
loras = [load_file(f"{d}/pytorch_lora_weights.safetensors") for d in args.loras]
merged = {}
for key in loras[0]:
    parts = [lora[key] for lora in loras]
    if ".lora.down." in key:
        merged[key] = torch.cat(parts, 0).contiguous()
    else:
        assert ".lora.up." in key, key
        merged[key] = (torch.cat(parts, 1) * (args.scale / len(parts))).contiguous()
args.out.mkdir(parents=True, exist_ok=True)
save_file(merged, str(args.out / "pytorch_lora_weights.safetensors"), metadata={"format": "pt"})
