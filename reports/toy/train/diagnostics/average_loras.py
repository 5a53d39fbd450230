"""Diagnostic (session 20): one LoRA whose update is the exact mean of several LoRAs' updates.

    python average_loras.py OUT LORA_DIR [LORA_DIR ...]

Each module's update of a LoRA is up @ down (scale 1: comat writes alpha = rank, and the file carries no alpha), so
concatenating the downs along the rank and the ups, divided by their number, along the rank gives
mean_i(up_i @ down_i) as one LoRA of rank n*r that `comat toy compare --ckpt OUT` loads like any other.
Averaging the factors themselves would not: (mean up) @ (mean down) has cross terms between runs."""
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

out, dirs = Path(sys.argv[1]), sys.argv[2:]
loras = [load_file(f"{d}/pytorch_lora_weights.safetensors") for d in dirs]
merged = {}
for key in loras[0]:
    parts = [lora[key] for lora in loras]
    if ".lora.down." in key:
        merged[key] = torch.cat(parts, 0).contiguous()
    else:
        assert ".lora.up." in key, key
        merged[key] = (torch.cat(parts, 1) / len(parts)).contiguous()
out.mkdir(parents=True, exist_ok=True)
save_file(merged, str(out / "pytorch_lora_weights.safetensors"), metadata={"format": "pt"})
