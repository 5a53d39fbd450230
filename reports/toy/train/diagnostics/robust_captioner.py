"""Experiment (session 7): fine-tune toy/blip adversarially (3-step PGD, L_inf eps/255, half of each batch), the
known way to give a small classifier perception-aligned input gradients. Usage: python robust_captioner.py STEPS EPS OUT"""
import shutil, sys, time
from pathlib import Path
import numpy as np, torch, torch.nn.functional as F
from transformers import BlipForConditionalGeneration
from comat.models.captioners import token_log_probs
from comat.toy.recipes import clip_normalize, corrupt
from comat.toy.recipes_text import BlipCaptionerRecipe, augment, caption_batch, sample_open_batch, _next_token_loss
from comat.toy.pretrain import export_fp16

torch.manual_seed(0); torch.set_num_threads(1)
steps, eps, n_pgd = int(sys.argv[1]), float(sys.argv[2]) / 255, 3
out = Path(sys.argv[3])
src = Path("comat/toy/zoo/blip")
model = BlipForConditionalGeneration.from_pretrained(src, dtype=torch.float32)
recipe = BlipCaptionerRecipe()
opt = torch.optim.AdamW(model.parameters(), lr=2e-4)
rng = np.random.default_rng(0)

def losses(x, ids, mask, targets, n, keep):
    logits, _ = recipe._forward(model, clip_normalize(x), ids, mask, False)
    loss, acc = _next_token_loss(logits[:n], targets[:n])
    logp = token_log_probs(logits[:, :-1], targets[:, 1:])
    margin = (logp[:n] - logp[n:])[keep]
    return loss + F.softplus(-margin).mean(), acc, (margin > 0).float().mean().item()

t0 = time.time()
for step in range(1, steps + 1):
    images, prompts, rendered = sample_open_batch(32, rng)
    negatives = [corrupt(r.scene.spec, rng).text for r in rendered]
    ids, mask, targets = caption_batch(recipe.tokenizer, prompts + negatives, *recipe._ids())
    keep = torch.tensor([a != b for a, b in zip(prompts, negatives)])
    x = augment(images, rng)
    delta = (torch.rand_like(x) * 2 - 1) * eps
    model.eval()
    for _ in range(n_pgd):
        delta.requires_grad_(True)
        l, _, _ = losses((x + delta).clamp(0, 1), ids, mask, targets, len(prompts), keep)
        g, = torch.autograd.grad(l, delta)
        delta = (delta.detach() + 2.5 * eps / n_pgd * g.sign()).clamp(-eps, eps)
    model.train()
    half = len(x) // 2  # half clean, half adversarial: keeps clean accuracy
    x_train = torch.cat([x[:half], (x[half:] + delta[half:]).clamp(0, 1)])
    loss, acc, swap = losses(x_train, ids, mask, targets, len(prompts), keep)
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step()
    if step % 25 == 0:
        print(f"{step} loss={loss.item():.3f} token_acc={acc:.3f} swap_acc={swap:.3f} {time.time()-t0:.0f}s", flush=True)
    if step % 200 == 0 or step == steps:
        tmp = out.with_suffix(".tmp"); shutil.rmtree(tmp, ignore_errors=True); shutil.copytree(src, tmp)
        export_fp16(model.eval(), tmp); shutil.rmtree(out, ignore_errors=True); tmp.rename(out)
