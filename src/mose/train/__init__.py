"""Training: recipes of stages (backbone, convert, router, sft) on Accelerate.

A layer over the library: mose itself never imports it.

    from mose.train import load_recipe, train
    train(load_recipe("configs/demo.yaml", ["stages.sft.lr=3e-4"]), resume=True)
"""

from mose.train.recipe import Recipe, RecipeError, load_recipe
from mose.train.run import train

__all__ = ["Recipe", "RecipeError", "load_recipe", "train"]
