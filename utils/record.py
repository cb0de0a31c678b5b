"""A run's record: its folder, every file it writes and reads back, and the one answer to "where does this run
stand?".

    {results_dir}/{recipe}/recipe.json     the recipe (recipe.py): the identity of every run in the folder
    {results_dir}/{recipe}/seed{N}/        one run, the recipe at --seed N:
        args.json          how it was made: the recipe, every flag as given, the data's fingerprint, the commit,
                           the library versions and the device; its params, FLOPs and status
        statistics.csv     one EpochRow per epoch
        layers.csv         the layer statistics (utils/layerstats.py)
        checkpoint.pth     what a resume needs; dropped when the run finishes, unless --keep_checkpoint
        model.pth          the final weights, with the final args.json and statistics inside
        events.out.*       TensorBoard's (utils/board.py)
        train.log          the run's output, where sweep.py started it
        .lock              held by the one process that trains the run
The folder of a recipe is found by its recipe.json, never by its name: a name is for reading, and a new
recipe whose name another recipe holds gets a name of its own. A folder is claimed by creating its
recipe.json with a hard link, which two processes cannot both do, on a local or a network file system.
"""
import fcntl
import itertools
import json
import os
import subprocess
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import pandas as pd
import torch

from recipe import IDENTITY, Context, Recipe
from utils.cli import UserError
from utils.files import create_once, make_results_dir, read_json, read_torch, save_torch, write_csv, write_json
from utils.layerstats import LAYER_COLUMNS

RECIPE = "recipe.json"
DONE = ("finished", "diverged")  # statuses that are results: never trained again


@dataclass
class EpochRow:
    """One row of statistics.csv: an epoch's training sums and its evaluation."""
    epoch: int
    lr: float  # of the epoch's first step
    train_loss: float
    train_top1: float
    test_loss: float
    test_top1: float
    test_top5: float
    seconds: float  # the epoch's training and evaluation
    # on the --val_images held out of the training split; None without it, as in runs made before it
    val_loss: Optional[float] = None
    val_top1: Optional[float] = None
    val_top5: Optional[float] = None


EPOCH_COLUMNS = [f.name for f in fields(EpochRow)]
VAL_COLUMNS = [c for c in EPOCH_COLUMNS if c.startswith("val_")]  # the last of them


def git_commit() -> str:
    """This checkout's commit, with -dirty when its code (a tracked .py file) has changed; empty outside a git
    checkout. Only code counts: runs write into the checkout's results/, whose committed CSVs they update."""
    here = Path(__file__).resolve().parents[1]
    try:
        run = lambda *a: subprocess.run(["git", "-C", str(here), *a], capture_output=True, text=True,  # noqa: E731
                                        timeout=30, check=True).stdout.strip()
        changed = run("status", "--porcelain", "--untracked-files=no", "--", "*.py")
        return run("rev-parse", "HEAD") + ("-dirty" if changed else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def provenance(device_name: str) -> dict:
    return {"device_name": device_name, "git_commit": git_commit(), "torch_version": str(torch.__version__),
            "cuda_version": torch.version.cuda if torch.cuda.is_available() else ""}


# -----------------------------------------------------------------------------
# a recipe's folder

def read_recipe(folder: Path) -> Optional[Recipe]:
    """The recipe in folder's recipe.json; None where there is none, or none this tool can read."""
    try:
        return Recipe.from_json(json.loads((folder / RECIPE).read_text()))
    except (OSError, ValueError):
        return None


def find_recipe(results_dir: Path, recipe: Recipe, context: Context) -> Optional[Path]:
    """The folder whose recipe.json holds recipe, looked for first under its own name."""
    named = results_dir / recipe.name(context)
    if read_recipe(named) == recipe:
        return named
    return next((f.parent for f in sorted(results_dir.glob(f"*/{RECIPE}")) if read_recipe(f.parent) == recipe),
                None)


def _names(results_dir: Path, recipe: Recipe, context: Context):
    """Names for a new recipe's folder, best first: its own; where another recipe holds that, its own and what
    differs from that one (..._bf16); then its own and a hash of the recipe, numbered if need be."""
    name = recipe.name(context)
    if (results_dir / name / RECIPE).exists() and read_recipe(results_dir / name) is None:
        raise UserError(f"cannot read {results_dir / name / RECIPE}, the recipe of the folder this run's recipe is "
                        f"named for; it is left as it is: repair it, or move {results_dir / name} away")
    yield name
    holder = read_recipe(results_dir / name)
    if holder is not None and len(recipe.spelled_against(holder)) <= 60:
        yield f"{name}_{recipe.spelled_against(holder)}"
    digest = f"{name}_{recipe.digest()}"
    yield digest
    yield from (f"{digest}_{i}" for i in itertools.count(2))


def recipe_folder(results_dir, recipe: Recipe, context: Context, create: bool = False) -> Path:
    """The folder of recipe: the one whose recipe.json holds it, else the first of its names that no other
    recipe holds, made and claimed with its recipe.json where create."""
    results_dir = Path(results_dir)
    found = find_recipe(results_dir, recipe, context) if results_dir.is_dir() else None
    if found is not None:
        return found
    text = json.dumps(recipe.to_json(), indent=2) + "\n"
    for name in _names(results_dir, recipe, context):
        folder = results_dir / name
        if not create:
            if not (folder / RECIPE).exists():
                return folder
            continue
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot make {folder} ({e.strerror}); pick another --results_dir") from None
        if create_once(folder / RECIPE, text) or read_recipe(folder) == recipe:
            return folder


# -----------------------------------------------------------------------------
# the record of one run

class RunRecord:
    """Every file of one run, and the events that write them: start, end_epoch, finish, diverge, interrupt.
    Used as a context manager, it holds the run's lock: one process trains a run. With enabled=False (DDP ranks
    other than 0, and every reader) it reads but never writes or locks, so the training loop needs no rank
    checks.

    head: the args.json being written: the recipe, the seed, every flag as given, the data's fingerprint,
    params, FLOPs and provenance (cls.run_head)."""

    def __init__(self, folder: Path, recipe: Recipe, seed: int, enabled: bool = False,
                 keep_checkpoint: bool = False, context: Optional[Context] = None):
        self.recipe, self.seed, self.enabled, self.keep_checkpoint = recipe, seed, enabled, keep_checkpoint
        self.dir, self.context = Path(folder) / f"seed{seed}", context
        self.head, self.epochs, self.layers, self._lock_file = None, [], [], None

    @classmethod
    def of(cls, results_dir, recipe: Recipe, seed: int, context: Context, enabled: bool = False,
           keep_checkpoint: bool = False) -> "RunRecord":
        """The record of recipe at seed under results_dir: in the folder whose recipe.json holds the recipe, or
        where a new one would go. Nothing is made before the record is entered."""
        return cls(recipe_folder(results_dir, recipe, context), recipe, seed, enabled, keep_checkpoint, context)

    @classmethod
    def of_args(cls, args, device_type: str, world: int = 1, enabled: bool = False) -> "RunRecord":
        """The record of the run that cls.py's flags name, on a device of this type and `world` processes: what
        cls.py writes, and sweep.py and the tests read."""
        context = Context.of(args, device_type, world)
        return cls.of(args.results_dir, Recipe.resolve(args, context), args.seed, context, enabled,
                      args.keep_checkpoint)

    @property
    def name(self) -> str:
        return f"{self.dir.parent.name}/{self.dir.name}"

    args = property(lambda self: self.dir / "args.json")
    statistics = property(lambda self: self.dir / "statistics.csv")
    layers_csv = property(lambda self: self.dir / "layers.csv")
    checkpoint = property(lambda self: self.dir / "checkpoint.pth")
    weights = property(lambda self: self.dir / "model.pth")
    lock = property(lambda self: self.dir / ".lock")
    log = property(lambda self: self.dir / "train.log")

    def __enter__(self) -> "RunRecord":
        """Enabled: the recipe's folder claimed, the run's made, and the run's lock held."""
        if self.enabled:
            self.make_folder()
            self._lock_file = self._acquire()
        return self

    def make_folder(self) -> None:
        """The recipe's folder, claimed with its recipe.json where it is new, and the run's folder in it."""
        results_dir = self.dir.parent.parent
        make_results_dir(results_dir)
        self.dir = recipe_folder(results_dir, self.recipe, self.context, create=True) / self.dir.name
        try:
            self.dir.mkdir(exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot make {self.dir} ({e.strerror}); pick another --results_dir") from None

    def _acquire(self):
        """The run's lock file, locked. Its holder removes it on exit, so a process that locked a file just
        removed tries again on the new one (the file at the path is the one that counts)."""
        while True:
            try:
                f = open(self.lock, "a+")
            except OSError as e:  # a folder in its place, a full disk
                raise UserError(f"cannot open the run's lock {self.lock} ({e.strerror}); move it away, or pick "
                                f"another --results_dir") from None
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "?"
                f.close()
                raise UserError(f"{self.name} is being trained by another process (pid {holder}); wait for it "
                                f"to end, or stop it and resume") from None
            if self.lock.exists() and os.stat(self.lock).st_ino == os.fstat(f.fileno()).st_ino:
                try:  # unbuffered, so that closing f has nothing left to write
                    os.ftruncate(f.fileno(), 0)
                    os.write(f.fileno(), f"{os.getpid()}\n".encode())
                except OSError as e:  # a full disk
                    f.close()
                    self.lock.unlink(missing_ok=True)
                    raise UserError(f"cannot write {self.lock} ({e.strerror}); free space or pick another "
                                    f"--results_dir, then run again") from None
                return f
            f.close()

    def __exit__(self, *exc_info) -> None:
        if self._lock_file is not None:
            self.lock.unlink(missing_ok=True)
            self._lock_file.close()
            self._lock_file = None

    # -------------------------------------------------------------------------
    # questions, answered from the run's own files

    def status(self) -> Optional[str]:
        """finished, diverged or incomplete, from the run's own files; None if it has none. The weights, where
        they are, decide: a run whose model.pth says it finished is finished, whatever its args.json says."""
        if self.weights.exists():
            self.own(read_torch(self.weights, "weights file")["head"], self.weights)
            if not self.statistics.exists():
                raise UserError(f"{self.name} finished, but its statistics.csv is missing from {self.dir}; "
                                f"restore it, or move {self.dir} away to train it again")
            return "finished"
        saved = self.saved()
        status = saved and saved.get("status", "incomplete")
        if status == "finished":
            raise UserError(f"{self.name} finished, but its model.pth is missing from {self.dir}; restore it, or "
                            f"move {self.dir} away to train it again")
        return status

    def saved(self) -> Optional[dict]:
        """The run's head as its files hold it: args.json, or where that is gone, its checkpoint's."""
        if self.args.exists():
            return self.own(read_json(self.args), self.args)
        if self.checkpoint.exists():
            return self.own(read_torch(self.checkpoint, "checkpoint")["head"], self.checkpoint)
        if self.statistics.exists():
            raise UserError(f"{self.statistics} has no args.json or checkpoint beside it, so nothing says how it "
                            f"was made; move {self.dir} away to train it again")
        return None

    def own(self, head: dict, source: Path) -> dict:
        """head, refused in one line unless it is this run's: this recipe at this seed."""
        try:
            theirs = Recipe.from_json(head.get("recipe"))
        except ValueError as e:
            raise UserError(f"{source} holds no recipe ({e}); move it away to start {self.name} over") from None
        if theirs == self.recipe and head.get("seed") == self.seed:
            return head
        flag = next((f for f in IDENTITY if theirs[f] != self.recipe[f]), "seed")
        then, now = (theirs[flag], self.recipe[flag]) if flag != "seed" else (head.get("seed"), self.seed)
        raise UserError(f"{source} is another run's ({head.get('name')}): its --{flag} is {then}, this run's "
                        f"{now}; move it away to start {self.name} over, or use another --results_dir")

    def same_data(self, head: dict, saved: dict, source: Path) -> None:
        """Refuses, in one line, to go on with other data than the run's files were made on."""
        now, then = head.get("data_fingerprint"), saved.get("data_fingerprint")
        if now and then and now != then:
            raise UserError(f"the data under --data_path {head['flags']['data_path']} is not the data {source} was "
                            f"made on (fingerprint {now}, not {then}); {self.name} cannot go on with it: use the "
                            f"same data, or another --results_dir")

    def resume_point(self) -> tuple:
        """(epoch, step) that a resume starts from: its checkpoint's, or the first."""
        if not self.checkpoint.exists():
            return 1, 0
        progress = read_torch(self.checkpoint, "checkpoint").get("state", {}).get("progress", {})
        return progress.get("epoch", 1), progress.get("step", 0)

    def resumable(self, head: dict) -> Optional[dict]:
        """The checkpoint to resume from, checked to be this run's on this data; None where there is none."""
        saved = self.saved()
        if saved is not None:
            self.same_data(head, saved, self.args if self.args.exists() else self.checkpoint)
        if not self.checkpoint.exists():
            return None
        checkpoint = read_torch(self.checkpoint, "checkpoint", head["device"])
        self.same_data(head, self.own(checkpoint["head"], self.checkpoint), self.checkpoint)
        if "state" not in checkpoint:
            raise UserError(f"{self.checkpoint} holds no training state; move it away to start {self.name} over")
        return checkpoint

    # -------------------------------------------------------------------------
    # events

    def start(self, head: dict, checkpoint: Optional[dict]) -> None:
        """A new run, or one resumed from checkpoint (resumable's): args.json says it is under way."""
        if checkpoint is not None:
            self.epochs = [EpochRow(**row) for row in checkpoint["history"]]
            self.layers = checkpoint["layer_history"]
        self.head = {**head, "status": "incomplete", "epochs_done": len(self.epochs)}
        if self.enabled:
            write_json(self.head, self.args)

    def end_epoch(self, row: EpochRow, layer_rows: list, state: dict) -> None:
        """An epoch that is not the last: its rows, and the checkpoint after it, written before the CSVs, so that
        the CSVs never run ahead of what a resume restores."""
        self._add(row, layer_rows)
        self._save_checkpoint(state)
        self._write("incomplete")

    def finish(self, row: EpochRow, layer_rows: list, weights: dict, state: dict) -> None:
        """The last epoch: the weights, then the CSVs, then args.json saying finished; the checkpoint goes
        unless --keep_checkpoint."""
        self._add(row, layer_rows)
        if self.keep_checkpoint:
            self._save_checkpoint(state)
        if self.enabled:
            final = {**self.head, "status": "finished", "epochs_done": len(self.epochs)}
            save_torch({"model": weights, "head": final, "history": self.history()}, self.weights)
        self._write("finished")
        if self.enabled and not self.keep_checkpoint:
            self.checkpoint.unlink(missing_ok=True)

    def diverge(self, reason: str) -> None:
        """A non-finite loss: the finished epochs stay, and the run is a result that is never trained again."""
        self.head = {**self.head, "diverged": reason}
        self._write("diverged")

    def interrupt(self, state: dict) -> None:
        """A signal mid-epoch: the checkpoint at this step, for --resume."""
        self._save_checkpoint(state)
        self._write("incomplete")

    # -------------------------------------------------------------------------

    def history(self) -> list:
        return [asdict(r) for r in self.epochs]

    def _add(self, row: EpochRow, layer_rows: list) -> None:
        self.epochs.append(row)
        self.layers.extend(layer_rows)

    def _save_checkpoint(self, state: dict) -> None:
        if self.enabled:
            saved = {"state": state, "history": self.history(), "layer_history": self.layers, "head": self.head}
            save_torch(saved, self.checkpoint)

    def _write(self, status: str) -> None:
        """The CSVs, then args.json with the status: the moment the files say what happened."""
        self.head = {**self.head, "status": status, "epochs_done": len(self.epochs)}
        if not self.enabled:
            return
        write_csv(pd.DataFrame(self.history(), columns=EPOCH_COLUMNS), self.statistics)
        if self.layers:
            write_csv(pd.DataFrame(self.layers, columns=LAYER_COLUMNS), self.layers_csv)
        write_json(self.head, self.args)


def runs(results_dir) -> list:
    """(recipe folder, recipe or None where its recipe.json cannot be read, [seed folders]) of every recipe
    folder under results_dir, in name order."""
    folders = sorted(p.parent for p in Path(results_dir).glob(f"*/{RECIPE}"))
    return [(folder, read_recipe(folder), sorted(p for p in folder.glob("seed*") if p.is_dir()))
            for folder in folders]
