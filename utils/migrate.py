"""`python report.py --migrate`: the flat results folder of versions before recipe folders, moved into today's.

Before, run NAME kept its files side by side in --results_dir: NAME_args.json (every flag at its top level),
NAME_statistics.csv, NAME_layers.csv, NAME_checkpoint.pth and NAME_model.pth (each with the args.json as
"args"), NAME.log, tensorboard/NAME/ and .NAME.lock, with summary.csv over them all. Each run moves to
{recipe}/seed{N}/, its recipe worked out from its args.json as a run makes it today (recipe.py): the flags it
recorded as used, renamed flags under today's names, its device, processes and training images. Its args.json
becomes today's head, with the flat one's fields kept and `migrated_from` its old name; its checkpoint and
weights carry that head (and the weights its statistics). A run that cannot move is named in one line and
left as it was: one still training (its lock held), one whose recipe cannot be told, one whose new folder
already holds a run. The old summary.csv becomes summary-before-migration.csv, with any columns added by hand.
"""
import fcntl
import os
import shutil
from pathlib import Path

import pandas as pd
import torch

from model import NORMS
from recipe import ADDED, RECIPE_FLAGS, RENAMED, RESUMABLE, Context, Recipe
from utils.cli import UserError
from utils.files import read_json, save_torch, write_json
from utils.record import EPOCH_COLUMNS, RunRecord

OLD_FILES = {"statistics.csv": "_statistics.csv", "layers.csv": "_layers.csv"}


class Unmovable(Exception):
    """A run that stays where it is, and why."""


def recipe_of(old: dict, name: str) -> tuple:
    """(Recipe, seed, Context) of a flat args.json, as a run with those flags makes them today."""
    flags = {RENAMED.get(k, k): v for k, v in old.items()}
    if flags.get("init_images_used") is not None:  # the init as used, where the flag was left to its default
        flags["init_images"] = flags["init_images_used"]
    missing = [f for f in RECIPE_FLAGS if f not in flags and f not in ADDED]
    if missing:
        raise Unmovable(f"{name}_args.json does not record --{', --'.join(missing)}, so its recipe cannot be told")
    flags = {**ADDED, **flags}
    if NORMS[flags["norm_type"]].data_init and flags["init_images"] is None and not flags.get("train_images"):
        raise Unmovable(f"{name}_args.json does not record the init's images, so its recipe cannot be told")
    device = str(flags.get("device") or "cpu").split(":")[0]
    context = Context(device, int(flags.get("world_size") or 1), int(flags.get("train_images") or 0))
    return Recipe.resolve(flags, context), int(flags["seed"]), context


def head_of(old: dict, name: str, record: RunRecord) -> dict:
    """Today's args.json of a flat one: its recipe and seed, its flags as given, and every other field kept."""
    flags = {RENAMED.get(k, k): v for k, v in old.items() if RENAMED.get(k, k) in RECIPE_FLAGS + RESUMABLE}
    rest = {k: v for k, v in old.items() if RENAMED.get(k, k) not in RECIPE_FLAGS + RESUMABLE + ["name"]}
    return {"name": record.name, "recipe": record.recipe.to_json(), "seed": record.seed, "flags": flags,
            "device": old.get("device"), "compile": old.get("compile"), **rest, "migrated_from": name}


def read_old(path: Path) -> dict:
    """A checkpoint or weights file of the flat layout, which carried its args.json as "args"."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file
        raise Unmovable(f"cannot read {path} ({type(e).__name__}); its run is left as it is") from None
    if not isinstance(saved, dict) or "args" not in saved:
        raise Unmovable(f"{path} is not a checkpoint or weights file of this tool; its run is left as it is")
    return {k: v for k, v in saved.items() if k != "args"}


def not_training(results_dir: Path, name: str) -> None:
    lock = results_dir / f".{name}.lock"
    if not lock.exists():
        return
    with open(lock) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Unmovable(f"{name} is being trained (its lock {lock} is held); migrate after it ends") from None
    lock.unlink()


def move_run(results_dir: Path, name: str) -> str:
    """Run `name` from the flat layout into its recipe folder; returns its new name. Every old file is read
    before anything moves."""
    old = read_json(results_dir / f"{name}_args.json")
    not_training(results_dir, name)
    recipe, seed, context = recipe_of(old, name)
    checkpoint, weights = (read_old(results_dir / f"{name}_{kind}.pth") if (results_dir / f"{name}_{kind}.pth").exists()
                           else None for kind in ("checkpoint", "model"))
    record = RunRecord.of(results_dir, recipe, seed, context)
    if record.dir.exists() and any(record.dir.iterdir()):
        raise Unmovable(f"{record.dir} already holds a run of {name}'s recipe and seed; {name} is left as it is")
    record.make_folder()
    head = head_of(old, name, record)
    for new, suffix in OLD_FILES.items():
        if (results_dir / f"{name}{suffix}").exists():
            os.replace(results_dir / f"{name}{suffix}", record.dir / new)
    if checkpoint is not None:
        save_torch({**checkpoint, "head": {**head, "status": "incomplete"}}, record.checkpoint)
        (results_dir / f"{name}_checkpoint.pth").unlink()
    if weights is not None:
        history = pd.read_csv(record.statistics)[EPOCH_COLUMNS].to_dict("records")
        save_torch({"model": weights["model"], "head": head, "history": history}, record.weights)
        (results_dir / f"{name}_model.pth").unlink()
    write_json(head, record.args)
    (results_dir / f"{name}_args.json").unlink()
    move_output(results_dir, name, record)
    return record.name


def move_output(results_dir: Path, name: str, record: RunRecord) -> None:
    """The log and TensorBoard's events into the run's folder; the report's old plots of the run dropped, to
    be drawn again under its new name."""
    if (results_dir / f"{name}.log").exists():
        os.replace(results_dir / f"{name}.log", record.log)
    events = results_dir / "tensorboard" / name
    if events.is_dir():
        for f in events.iterdir():
            os.replace(f, record.dir / f.name)
        events.rmdir()
    for plot in ("curves", "layers"):
        (results_dir / plot / f"{name}.png").unlink(missing_ok=True)


def migrate(results_dir) -> tuple:
    """Every flat run of results_dir moved into its recipe folder: (the number moved, [a line for each left])."""
    results_dir, moved, left = Path(results_dir), 0, []
    for args in sorted(results_dir.glob("*_args.json")):
        name = args.name[:-len("_args.json")]
        try:
            move_run(results_dir, name)
            moved += 1
        except (Unmovable, UserError) as e:
            left.append(str(e))
    if (results_dir / "summary.csv").exists() and moved:
        os.replace(results_dir / "summary.csv", results_dir / "summary-before-migration.csv")
    (results_dir / ".summary.csv.lock").unlink(missing_ok=True)
    if (results_dir / "tensorboard").is_dir() and not any((results_dir / "tensorboard").iterdir()):
        shutil.rmtree(results_dir / "tensorboard")
    return moved, left
