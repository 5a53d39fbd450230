"""Every toy zoo recipe by name, in the order `comat toy pretrain` trains them (dependencies first)."""

from comat.toy.recipes import ClipRecipe, UnetRecipe, VaeRecipe
from comat.toy.recipes_text import TEXT_RECIPES
from comat.toy.recipes_vision import VISION_RECIPES

RECIPES = {r.name: r for r in (ClipRecipe, VaeRecipe, UnetRecipe)} | TEXT_RECIPES | VISION_RECIPES
