import json

import numpy as np
import pytest

from comat.core.errors import ComatError
from comat.toy import (
    BACKGROUND,
    CATEGORIES,
    COLORS,
    HELD_OUT,
    RGB,
    SHAPES,
    SIZE,
    caption_pairs,
    full_mask,
    parse_prompt,
    prompt_specs,
    prompts,
    render,
    render_grid,
    sample_batch,
    sample_scene,
    scene_for_prompt,
    shade,
    split_of,
)
from comat.toy.world import EXTENT, relation_holds

MULTI = [c for c in CATEGORIES if c != "single"]


@pytest.fixture(scope="module")
def rendered():
    rng = np.random.default_rng(123)
    return [render(sample_scene(c, rng, split)) for c in CATEGORIES for split in ("train", "eval")
            for _ in range(25)]


def test_deterministic_from_seed():
    a = sample_batch(12, np.random.default_rng(7), as_tensor=False)
    b = sample_batch(12, np.random.default_rng(7), as_tensor=False)
    c = sample_batch(12, np.random.default_rng(8), as_tensor=False)
    assert np.array_equal(a[0], b[0]) and a[1] == b[1]
    assert not np.array_equal(a[0], c[0])
    assert prompts("complex", "eval") == prompts("complex", "eval")
    assert np.array_equal(caption_pairs(5, seed=1)[0], caption_pairs(5, seed=1)[0])


def test_batch_tensor_format():
    images, texts, scenes = sample_batch(4, np.random.default_rng(0), categories=["color"])
    assert tuple(images.shape) == (4, 3, SIZE, SIZE) and images.dtype.is_floating_point
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0
    assert len(texts) == len(scenes) == 4 and all(s.scene.category == "color" for s in scenes)
    imgs, caps = caption_pairs(6, seed=0)
    assert imgs.shape == (6, SIZE, SIZE, 3) and imgs.dtype == np.uint8 and len(caps) == 6
    assert all(split_of(parse_prompt(c)) == "train" for c in caps)


def test_masks_boxes_and_colours(rendered):
    for r in rendered:
        img, scene = r.image, r.scene
        covered = np.zeros((SIZE, SIZE), bool)
        for o, mask, box in zip(scene.objects, r.masks, r.boxes):
            full = full_mask(o)
            # Nobody is (nearly) fully hidden; only "in front of" may occlude at all.
            assert mask.sum() >= 0.6 * full.sum() > 0
            pix = img[mask]
            ok = np.all(pix == o.rgb, 1) | np.all(pix == shade(o.rgb), 1)
            assert ok.all(), scene.prompt
            if o.texture == "plain":
                assert np.all(pix == o.rgb, 1).all()
            else:  # the texture is visible
                assert 0.08 < np.all(pix == shade(o.rgb), 1).mean() < 0.7
            nearest = min(COLORS, key=lambda c: sum((a - b) ** 2 for a, b in zip(RGB[c], o.rgb)))
            assert nearest == o.color
            x0, y0, x1, y1 = box
            ys, xs = np.nonzero(full)
            assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            assert 0 <= x0 < x1 <= SIZE and 0 <= y0 < y1 <= SIZE
            assert EXTENT[o.size][0] <= o.extent <= EXTENT[o.size][1]
            covered |= mask
        assert np.all(img[~covered] == BACKGROUND)
        if scene.relation is None or scene.relation.kind not in ("in front of", "behind"):
            assert sum(m.sum() for m in r.masks) == covered.sum()  # no overlaps


def test_relations_realised_geometrically(rendered):
    seen = set()
    for r in rendered:
        rel = r.scene.relation
        if rel is None:
            continue
        seen.add(rel.kind)
        a, b = r.scene.objects[rel.subject], r.scene.objects[rel.object]
        assert relation_holds(rel.kind, a, b), r.prompt
        (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = r.boxes[rel.subject], r.boxes[rel.object]
        acx, acy, bcx, bcy = (ax0 + ax1) / 2, (ay0 + ay1) / 2, (bx0 + bx1) / 2, (by0 + by1) / 2
        if rel.kind == "on the left of":
            assert ax1 < bx0 and acx < bcx and abs(bcy - acy) < bcx - acx
        elif rel.kind == "on the right of":
            assert bx1 < ax0 and acx > bcx and abs(bcy - acy) < acx - bcx
        elif rel.kind == "on the top of":
            assert ay1 < by0 and acy < bcy and abs(bcx - acx) < bcy - acy
        elif rel.kind == "on the bottom of":
            assert by1 < ay0 and acy > bcy and abs(bcx - acx) < acy - bcy
        elif rel.kind == "next to":
            assert min(abs(bx0 - ax1), abs(ax0 - bx1)) <= 7 and abs(bcy - acy) < abs(bcx - acx)
        else:
            front, back = (rel.subject, rel.object) if rel.kind == "in front of" else (rel.object, rel.subject)
            assert front > back  # drawn later
            assert r.masks[front].sum() == full_mask(r.scene.objects[front]).sum()
            assert r.masks[back].sum() < full_mask(r.scene.objects[back]).sum()
            assert r.scene.objects[front].color != r.scene.objects[back].color
    assert len(seen) == 7


def test_scene_matches_its_prompt(rendered):
    for r in rendered:
        spec = r.scene.spec
        assert len(r.scene.objects) == spec.n_objects
        for mi, m in enumerate(spec.mentions):
            objs = [r.scene.objects[i] for i in r.scene.objects_of(mi)]
            assert len(objs) == m.count
            for o in objs:
                assert o.shape == m.shape
                assert m.color in (None, o.color) and m.size in (None, o.size)
                assert o.texture == (m.texture or "plain")
        if spec.relation:
            kind, ms, mo = spec.relation
            rel = r.scene.relation
            assert rel.kind == kind
            assert r.scene.objects[rel.subject].mention == ms and r.scene.objects[rel.object].mention == mo


def test_prompt_grammar_round_trips():
    for c in CATEGORIES:
        for split in ("train", "eval"):
            for spec in prompt_specs(c, split):
                assert parse_prompt(spec.text) == spec, spec.text
    scene = scene_for_prompt("an orange circle and two blue squares", np.random.default_rng(0))
    assert scene.category == "counting"
    assert sorted((o.color, o.shape) for o in scene.objects)[:2] == [("blue", "square")] * 2
    s = scene_for_prompt("a big striped red circle behind a dotted cross", np.random.default_rng(0))
    assert s.category == "non_spatial" and s.relation.kind == "behind"
    for bad in ("a red dog", "a orange circle", "two red circle", "a circle on the left of two squares",
                "two circles and two squares"):
        with pytest.raises(ComatError):
            parse_prompt(bad)


def test_word_order_independent_of_placement():
    rng = np.random.default_rng(1)
    left_first = [sample_scene("color", rng) for _ in range(200)]
    share = np.mean([s.objects[0].cx < s.objects[1].cx for s in left_first])
    assert 0.35 < share < 0.65
    train = prompts("spatial", "train")
    assert any("on the left of" in p for p in train) and any("on the right of" in p for p in train)

def test_splits_disjoint_and_held_out():
    for c in CATEGORIES:
        train, ev = prompt_specs(c, "train"), prompt_specs(c, "eval")
        assert 50 <= len(ev) <= 100 and len(train) >= 150
        assert not {s.text for s in train} & {s.text for s in ev}
        assert not {s.key() for s in train} & {s.key() for s in ev}  # not even reworded
        if c in MULTI:
            for s in train:
                for m in s.mentions:
                    for kind, pair in m.pairs():
                        assert pair not in HELD_OUT[kind], s.text
            unseen = [s for s in ev if s.is_unseen()]
            assert 0 < len(unseen) < len(ev)
    held = [pair for pairs in HELD_OUT.values() for pair in pairs]
    assert all(any(f" {a} {s}" in p for p in prompts("color", "eval_unseen") + prompts("shape", "eval_unseen")
                   + prompts("texture", "eval_unseen")) for a, s in held)


def test_open_split_adds_held_out_pairs_but_no_evaluation_prompt():
    for c in MULTI:
        open_specs = prompt_specs(c, "open")
        ev = prompt_specs(c, "eval")
        assert not {s.key() for s in open_specs} & {s.key() for s in ev}
        assert any(s.is_unseen() for s in open_specs) and not all(s.is_unseen() for s in open_specs)
    held = {("color", p) for p in HELD_OUT["color"]}
    bound = {(k, p) for s in prompt_specs("color", "open") for m in s.mentions for k, p in m.pairs()}
    assert held <= bound  # every held-out colour pair appears in some open training prompt


def test_single_train_covers_every_colour_and_shape():
    singles = prompt_specs("single", "train")
    pairs = {(s.mentions[0].color, s.mentions[0].shape) for s in singles}
    assert {(c, s) for c in COLORS for s in SHAPES} <= pairs


def test_render_grid_writes_files(tmp_path):
    png = render_grid(tmp_path / "grid", n=6, seed=3, category="complex")
    from PIL import Image

    img = Image.open(png)
    assert img.size[0] > SIZE * 4 * 2
    lines = (tmp_path / "grid" / "prompts.txt").read_text().splitlines()
    gt = json.loads((tmp_path / "grid" / "scenes.json").read_text())
    assert len(lines) == len(gt) == 6 and [g["prompt"] for g in gt] == lines
    assert all(len(g["objects"]) == 3 and g["relation"] for g in gt)
