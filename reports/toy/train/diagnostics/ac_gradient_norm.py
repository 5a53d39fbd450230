"""Diagnostic (session 17): LoRA gradient norms of the concept-activation and attribute-concentration terms on three
batches of four colour prompts (preset toy with AC on at the paper's alpha 1e-3 / beta 5e-5, D and mixed latent off).
Usage: python ac_gradient_norm.py"""
import tempfile
import numpy as np, torch
from comat.train import Trainer
from comat.train_config import load_train_config
from comat.methods import Batch
torch.set_num_threads(1)
cfg = load_train_config("toy", None, ("discriminator.kind=none", "mixed_latent.enabled=false",
                                      "attribute_concentration.enabled=true"))
tr = Trainer(cfg, tempfile.mkdtemp(), log=lambda *a: None)
params = tr.updates[0].params
prompts = ["a purple square and a blue circle", "a red triangle and a green cross", "a yellow circle and an orange square", "a blue cross and a red square"]
for k in range(3):
    b = Batch(prompts, 0, torch.Generator().manual_seed(100 + k), np.random.default_rng(k))
    t = tr.method.training_loss(b)
    gi = torch.autograd.grad(t["i2t"], params, retain_graph=True)
    gp = torch.autograd.grad(t["ac_pos"], params, retain_graph=True, allow_unused=True)
    gn = torch.autograd.grad(t["ac_neg"], params, allow_unused=True)
    n = lambda g: float(torch.sqrt(sum((x**2).sum() for x in g if x is not None)))
    print({k2: round(float(v), 5) for k2, v in t.items()}, "norms i2t %.3g pos %.3g neg %.3g" % (n(gi), n(gp), n(gn)), flush=True)
