"""Diagnostic (session 7): does toy/blip's log p(prompt | sample) tell right from wrong colour bindings on the toy
T2I's own samples (eval colour prompts, 4 seeds each, judged by toy/vqa)? Usage: python captioner_signal.py CAPTIONER..."""
import sys, torch
from pathlib import Path
from comat.toy.eval_zoo import ZooEvalConfig, sample_images
from comat.toy.prompts import prompt_specs
from comat.judges.vqa import VqaJudge
from comat.models.captioners import load_captioner
from comat.models.t2i import load_t2i
zoo = Path("comat/toy/zoo")
cfg = ZooEvalConfig()
vqa = VqaJudge.load(str(zoo / "vqa"))
color = prompt_specs("color", "eval")
imgs = sample_images(load_t2i(str(zoo / "t2i")), [s.text for s in color], cfg)
specs = [s for s in color for _ in range(cfg.images_per_prompt)]
ok = (vqa.yes_probability(imgs, [s.mentions[0].text + "?" for s in specs]) > 0.5) & (vqa.yes_probability(imgs, [s.mentions[1].text + "?" for s in specs]) > 0.5)
unseen = torch.tensor([s.is_unseen() for s in specs])
def auc(score, label):
    pos, neg = score[label], score[~label]
    return (pos[:, None] > neg[None]).float().mean().item()
for path in sys.argv[1:]:
    cap = load_captioner("blip", path)
    with torch.no_grad():
        lp = torch.cat([cap.log_prob(imgs[i:i+64], [s.text for s in specs[i:i+64]]) for i in range(0, len(specs), 64)])
        # swapped colours: same objects, colours exchanged
        sw = []
        for s in specs:
            a, b = s.mentions
            sw.append(s.text.replace(f"{a.color} {a.shape}", "@A").replace(f"{b.color} {b.shape}", f"{a.color} {b.shape}").replace("@A", f"{b.color} {a.shape}"))
        ls = torch.cat([cap.log_prob(imgs[i:i+64], sw[i:i+64]) for i in range(0, len(specs), 64)])
    m = lp - ls
    print(path, f"right={ok.float().mean():.3f} AUC(logp, right)={auc(lp, ok):.3f} unseen {auc(lp[unseen], ok[unseen]):.3f} "
          f"AUC(logp-swapped, right)={auc(m, ok):.3f}; share where true caption beats swap: right {(m[ok]>0).float().mean():.3f} wrong {(m[~ok]>0).float().mean():.3f}")
