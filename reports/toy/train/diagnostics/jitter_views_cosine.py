"""Diagnostic (session 17): mean pairwise cosine of the concept-activation LoRA gradients of one prompt under 6 noise
draws when the captioner loss is averaged over 1, 4 or 16 jittered views of each sample (preset toy, D, mixed latent
and AC off). Usage: python jitter_views_cosine.py (from this folder: it uses gradient_cosine.py)"""
import tempfile
import numpy as np, torch
from comat.train import Trainer
from comat.train_config import load_train_config
from gradient_cosine import pairwise_cosine
torch.set_num_threads(1)
cfg = load_train_config("toy", None, ("discriminator.kind=none", "mixed_latent.enabled=false", "attribute_concentration.enabled=false"))
tr = Trainer(cfg, tempfile.mkdtemp(), log=lambda *a: None)
orig = tr.method._i2t
for views in (1, 4, 16):
    tr.method._i2t = lambda images, texts, g, v=views: sum(orig(images, texts, g) for _ in range(v)) / v
    cos, _ = pairwise_cosine(tr, "a purple square and a blue circle")
    print("views", views, "pairwise cos mean %.3f min %.3f max %.3f" % (np.mean(cos), min(cos), max(cos)), flush=True)
