"""Diagnostic (session 7): mean pairwise cosine of the concept-activation LoRA gradients of one prompt under 6 noise
draws (batch 4, discriminator, mixed latent and AC off). Usage: python gradient_cosine.py CAPTIONER..."""
import itertools, sys, tempfile
import numpy as np, torch
from comat.train import Trainer
from comat.train_config import load_train_config
from comat.methods import Batch


def pairwise_cosine(tr, prompt, draws=6):
    """Cosines between the i2t LoRA gradients of ``draws`` noise draws of a batch of four ``prompt``; their losses."""
    params = tr.updates[0].params
    grads, losses = [], []
    for k in range(draws):
        b = Batch([prompt] * 4, 0, torch.Generator().manual_seed(100 + k), np.random.default_rng(k))
        loss = tr.method.training_loss(b)["i2t"]
        grads.append(torch.cat([x.flatten() for x in torch.autograd.grad(loss, params)])); losses.append(loss.item())
    return [torch.cosine_similarity(a, c, 0).item() for a, c in itertools.combinations(grads, 2)], losses


if __name__ == "__main__":
    prompt = "a red triangle and a blue square"
    for cap in sys.argv[1:]:
        cfg = load_train_config("toy", None, ("prompts=toy-open", "discriminator.kind=none", "mixed_latent.enabled=false",
                                              "attribute_concentration.enabled=false", f"captioner.model={cap}"))
        cos, losses = pairwise_cosine(Trainer(cfg, tempfile.mkdtemp(), log=lambda *a: None), prompt)
        print(cap, "i2t", np.round(losses, 2), "pairwise cos mean %.3f min %.3f max %.3f" % (np.mean(cos), min(cos), max(cos)), flush=True)
