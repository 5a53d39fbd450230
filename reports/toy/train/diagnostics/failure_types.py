"""Diagnostic (session 15): failure types of the base t2i on the colour evaluation prompts (eval-zoo's samples: DDIM
25, guidance 4, seeds 0-3), judged by toy/vqa: per failed mention, is its colour on another shape, its shape in another
colour (leakage when that is the other object's), or neither (missing)? Usage: python failure_types.py [ZOO]"""
import sys, collections
from pathlib import Path
from comat.judges.vqa import VqaJudge
from comat.models.t2i import load_t2i
from comat.toy.eval_zoo import ZooEvalConfig, sample_images
from comat.toy.prompts import prompt_specs, SHAPES, COLORS
zoo = Path(sys.argv[1] if len(sys.argv) > 1 else "comat/toy/zoo")
pipe = load_t2i(str(zoo / "t2i")); vqa = VqaJudge.load(str(Path("comat/toy/zoo") / "vqa"))
cfg = ZooEvalConfig()
color = prompt_specs("color", "eval")
images = sample_images(pipe, [s.text for s in color], cfg)
specs = [s for s in color for _ in range(cfg.images_per_prompt)]
counts = collections.Counter()
for half in ("seen", "unseen"):
    for i, s in enumerate(specs):
        if s.is_unseen() != (half == "unseen"): continue
        for j, m in enumerate(s.mentions):
            other = s.mentions[1 - j]
            img = images[i:i+1]
            ok = vqa.yes_probability(img, [m.text + "?"]).item() > 0.5
            if ok: counts[half, "right"] += 1; continue
            qs_shape = [f"a {m.color} {sh}?" for sh in SHAPES if sh != m.shape]
            qs_color = [f"a {c} {m.shape}?" for c in COLORS if c != m.color]
            ps = vqa.yes_probability(img.expand(len(qs_shape), -1, -1, -1), qs_shape)
            pc = vqa.yes_probability(img.expand(len(qs_color), -1, -1, -1), qs_color)
            shapes_seen = [sh for sh, p in zip([x for x in SHAPES if x != m.shape], ps) if p > 0.5]
            colors_seen = [c for c, p in zip([x for x in COLORS if x != m.color], pc) if p > 0.5]
            if shapes_seen:
                kind = "colour on other shape" + (" (= other object's shape)" if other.shape in shapes_seen else "")
            elif colors_seen:
                kind = "shape in other colour" + (" (= other object's colour)" if other.color in colors_seen else "")
            else:
                kind = "missing"
            counts[half, kind] += 1
for k in sorted(counts): print(k, counts[k])
