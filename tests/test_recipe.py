"""thoracic_seg/recipe.py: the Makefile's recipe variables, and the README, notebook and quality benchmark
using exactly them."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import train_multi_organ
from thoracic_seg.recipe import MAKEFILE, load_recipe, read_make_variables

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_make_variables_are_read_as_make_reads_them():
    text = ("A ?= one \\\n\t two  # a comment\nB := x\nB = y\n\trecipe line: not an assignment\n"
            "target: dep\nC=\n")
    assert read_make_variables(text) == {"A": "one two", "B": "y", "C": ""}


def test_the_repository_recipe():
    recipe = load_recipe()
    assert recipe.phase3_args == ("--crop-body",)
    assert recipe.train_args == ("--augment", "--tumour-oversampling", "0.3", "--context-slices", "0",
                                 "--lr-schedule", "cosine")
    assert recipe.cpu_size == 128
    assert recipe.cpu_train_args == ("--base-channels", "16", "--batch-size", "8", "--lr", "1e-3")
    assert recipe.ensemble_seeds == (0, 1)
    assert train_multi_organ.recipe_options(recipe.train_args) == {
        "augment": True, "tumour_oversampling": 0.3, "lr_schedule": "cosine"}  # K = 0 is the default


@pytest.mark.parametrize("text, message", [
    ("REAL_PHASE3_ARGS ?= --crop-body\n", "the recipe variable REAL_TRAIN_ARGS is not set"),
    ("REAL_PHASE3_ARGS ?= $(X)\nREAL_TRAIN_ARGS ?=\nCPU_SIZE ?= 1\nCPU_TRAIN_ARGS ?=\nREAL_ENSEMBLE_SEEDS ?= 0\n",
     r"REAL_PHASE3_ARGS = '\$\(X\)' refers to another variable"),
    ("REAL_PHASE3_ARGS ?=\nREAL_TRAIN_ARGS ?=\nCPU_SIZE ?= big\nCPU_TRAIN_ARGS ?=\nREAL_ENSEMBLE_SEEDS ?= 0\n",
     "CPU_SIZE must be an integer, got 'big'"),
    ("REAL_PHASE3_ARGS ?=\nREAL_TRAIN_ARGS ?=\nCPU_SIZE ?= 1\nCPU_TRAIN_ARGS ?=\n",
     "the recipe variable REAL_ENSEMBLE_SEEDS is not set"),
    *[(f"REAL_PHASE3_ARGS ?=\nREAL_TRAIN_ARGS ?=\nCPU_SIZE ?= 1\nCPU_TRAIN_ARGS ?=\nREAL_ENSEMBLE_SEEDS ?={seeds}\n",
       f"REAL_ENSEMBLE_SEEDS must be one or more distinct integers, got '{seeds.strip()}'")
      for seeds in ("", " 0 0", " a")],
])
def test_bad_recipes_are_refused(tmp_path, text, message):
    (tmp_path / "Makefile").write_text(text)
    with pytest.raises(ValueError, match=message):
        load_recipe(tmp_path / "Makefile")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_recipe(tmp_path / "none")


def test_readme_commands_use_the_recipe():
    recipe, readme = load_recipe(), (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    phase3 = re.search(r"^python normalize_ct_and_masks\.py (.*?)\s+#", readme, re.M).group(1)
    seeds, train = re.search(r"^for seed in (.*?); do python train_multi_organ\.py (.*?) --device cuda --seed \$seed "
                             r"--output-dir runs/seed-\$seed \|\| break; done", readme, re.M).groups()
    assert phase3.split() == list(recipe.phase3_args)
    assert train.split() == list(recipe.train_args)
    assert tuple(map(int, seeds.split())) == recipe.ensemble_seeds  # one network per seed, all in prediction:
    assert re.search(r"^python predict_multi_organ\.py .*--checkpoint runs/seed-\*/best_unet_multi_organ\.pth ", readme, re.M)


def test_notebook_takes_the_recipe_from_the_makefile():
    notebook = json.loads((REPO_ROOT / "colab_training_multi_organ.ipynb").read_text(encoding="utf-8"))
    code = "\n".join("".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code")
    assert "train_multi_organ.recipe_options(load_recipe().train_args)" in code
    real_settings = code[code.index("RUN_NAME = \"quick_synthetic\"\nelse:"):code.index("RUN_NAME = f\"colab-seed-{SEED}\"")]
    for key in train_multi_organ.recipe_options(load_recipe().train_args):  # not set twice
        assert f"{key}=" not in real_settings
    seeds = re.search(r"# The recipe trains one network per seed of REAL_ENSEMBLE_SEEDS \((.*?)\)", real_settings)
    assert tuple(map(int, seeds.group(1).split(" and "))) == load_recipe().ensemble_seeds and "seed=SEED" in real_settings
    first = "".join(notebook["cells"][0]["source"])
    assert f"normalize_ct_and_masks.py {' '.join(load_recipe().phase3_args)}`" in first


def test_makefile_recipe_target_prints_it():
    assert "recipe:" in MAKEFILE.read_text(encoding="utf-8")
