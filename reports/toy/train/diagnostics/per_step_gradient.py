"""Diagnostic (session 7): size of the concept-activation LoRA gradient when only sampling step s is differentiated
(stop_grad on, as in training), s = 0 (noisiest) .. 19, for one prompt, mean over 4 noise draws of batch 4."""
import sys, tempfile
import numpy as np, torch
from comat.train import Trainer
from comat.train_config import load_train_config
from comat.sampling import initial_latents
prompt = sys.argv[1] if len(sys.argv) > 1 else "a green cross and a red circle"
cfg = load_train_config("toy", None, ("prompts=toy-open", "discriminator.kind=none", "mixed_latent.enabled=false",
                                      "attribute_concentration.enabled=false"))
tr = Trainer(cfg, tempfile.mkdtemp(), log=lambda *a: None)
m, params = tr.method, tr.updates[0].params
embeds = m.encode([prompt] * 4)
rows = []
for s in range(cfg.sample_steps):
    norms = []
    for k in range(4):
        g = torch.Generator().manual_seed(100 + k)
        z = initial_latents(m.pipe, 4, height=cfg.resolution, width=cfg.resolution, generator=g, scheduler=m.scheduler,
                            dtype=torch.float32)
        loss = m._i2t(m.decode(m._sample(embeds, z, [s], g, None)), [prompt] * 4, g)
        norms.append(torch.cat([x.flatten() for x in torch.autograd.grad(loss, params)]).norm().item())
    rows.append(np.mean(norms))
    print(f"step {s:2d} grad norm {rows[-1]:.4f}", flush=True)
