"""The real-collection recipe as data: five variables of the repository's Makefile, read by the quality
benchmark, the notebook and the tests that keep the README's commands in step with them.

    REAL_PHASE3_ARGS   phase 3 options (the crop), without --size
    REAL_TRAIN_ARGS    training options that decide what is learnt (augmentation, over-sampling,
                       context, schedule): no data paths, device, budget, width or batch
    CPU_SIZE           the CPU profile's slice size
    CPU_TRAIN_ARGS     the CPU profile's width, batch and learning rate
    REAL_ENSEMBLE_SEEDS  one network trained per seed; prediction averages their probabilities

The GPU profile is the training script's defaults (256 px, base 64). Changing the recipe means
changing those Makefile lines; nothing else names it.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

MAKEFILE = Path(__file__).resolve().parents[1] / "Makefile"
RECIPE_VARIABLES = ("REAL_PHASE3_ARGS", "REAL_TRAIN_ARGS", "CPU_SIZE", "CPU_TRAIN_ARGS", "REAL_ENSEMBLE_SEEDS")
_ASSIGNMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\s*(\?=|:=|=)\s*(.*)$")


@dataclass(frozen=True)
class Recipe:
    """The recipe's variables, split into arguments as a shell would."""

    phase3_args: tuple[str, ...]
    train_args: tuple[str, ...]
    cpu_size: int
    cpu_train_args: tuple[str, ...]
    ensemble_seeds: tuple[int, ...]


def read_make_variables(text: str) -> dict[str, str]:
    """``NAME ?= value`` / ``:=`` / ``=`` assignments at the start of a line (backslash continuations
    joined, ``#`` comments dropped) -> {NAME: value}; the last assignment wins, as in make."""
    variables: dict[str, str] = {}
    logical = re.sub(r"\s*\\\n\s*", " ", text)  # make joins a continuation with one space
    for line in logical.splitlines():
        match = _ASSIGNMENT.match(line.split("#", 1)[0].rstrip())
        if match:
            variables[match.group(1)] = match.group(3).strip()
    return variables


def load_recipe(makefile: Path = MAKEFILE) -> Recipe:
    """The recipe of ``makefile``. ``FileNotFoundError``; ``ValueError`` naming the variable when one is
    missing, refers to another (``$(...)``: keep them literal so every tool reads the same words) or
    CPU_SIZE is not an integer or REAL_ENSEMBLE_SEEDS not one or more distinct integers."""
    makefile = Path(makefile)
    if not makefile.is_file():
        raise FileNotFoundError(f"{makefile} not found: the recipe lives in the repository's Makefile")
    variables = read_make_variables(makefile.read_text(encoding="utf-8"))
    for name in RECIPE_VARIABLES:
        if name not in variables:
            raise ValueError(f"{makefile}: the recipe variable {name} is not set")
        if "$" in variables[name]:
            raise ValueError(f"{makefile}: {name} = {variables[name]!r} refers to another variable; "
                             "write the options literally")
    if not re.fullmatch(r"[0-9]+", variables["CPU_SIZE"]):
        raise ValueError(f"{makefile}: CPU_SIZE must be an integer, got {variables['CPU_SIZE']!r}")
    seeds = variables["REAL_ENSEMBLE_SEEDS"].split()
    if not seeds or not all(re.fullmatch(r"[0-9]+", s) for s in seeds) or len(set(map(int, seeds))) < len(seeds):
        raise ValueError(f"{makefile}: REAL_ENSEMBLE_SEEDS must be one or more distinct integers, got "
                         f"{variables['REAL_ENSEMBLE_SEEDS']!r}")
    return Recipe(tuple(shlex.split(variables["REAL_PHASE3_ARGS"])), tuple(shlex.split(variables["REAL_TRAIN_ARGS"])),
                  int(variables["CPU_SIZE"]), tuple(shlex.split(variables["CPU_TRAIN_ARGS"])),
                  tuple(int(s) for s in seeds))
