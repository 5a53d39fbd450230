"""The toy world: a CPU-scale compositional text-to-image world (scenes, prompts, ground truth)."""

from comat.toy.prompts import (
    CATEGORIES, COLORS, HELD_OUT, NON_SPATIAL_RELATIONS, RELATIONS, SHAPES, SIZES, SPATIAL_RELATIONS, SPLITS,
    TEXTURES, Mention, PromptSpec, parse_prompt, prompt_specs, prompts, random_spec, sample_spec, split_of,
)
from comat.toy.world import (
    BACKGROUND, RGB, SIZE, ObjectSpec, Relation, RenderedScene, Scene, caption_pairs, full_mask, realise,
    relation_holds, render, render_batch, render_grid, sample_batch, sample_scene, scene_for_prompt,
    scene_to_dict, shade,
)

__all__ = [
    "CATEGORIES", "COLORS", "HELD_OUT", "NON_SPATIAL_RELATIONS", "RELATIONS", "SHAPES", "SIZES",
    "SPATIAL_RELATIONS", "SPLITS", "TEXTURES", "Mention", "PromptSpec", "parse_prompt", "prompt_specs", "prompts",
    "random_spec", "sample_spec", "split_of",
    "BACKGROUND", "RGB", "SIZE", "ObjectSpec", "Relation", "RenderedScene", "Scene", "caption_pairs", "full_mask",
    "realise", "relation_holds", "render", "render_batch", "render_grid", "sample_batch", "sample_scene",
    "scene_for_prompt", "scene_to_dict", "shade",
]
