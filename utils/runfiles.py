"""A run's record: every file a run writes and reads back, and the one answer to "where does this run stand?".

The files of run NAME under --results_dir:
    NAME_args.json         how it was made (every flag, the data's fingerprint, the commit, the library versions,
                           the device), its params and FLOPs, and its status: the record's head
    NAME_statistics.csv    one EpochRow per epoch
    NAME_layers.csv        the layer statistics (utils/layerstats.py)
    NAME_checkpoint.pth    what a resume needs; dropped when the run finishes, unless --keep_checkpoint
    NAME_model.pth         the final weights
    .NAME.lock             held by the one process that trains the run
summary.csv is an index of the folder's runs, one row each, rewritten from the runs' own files: a finished or
diverged run is read as such from its files whatever summary.csv says, and `python report.py --rebuild_summary`
writes summary.csv anew from them.
"""
import fcntl
import hashlib
import json
import os
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import pandas as pd
import torch

from utils.cli import UserError
from utils.layerstats import LAYER_COLUMNS


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
    seconds: float  # training and evaluation, all epochs so far


EPOCH_COLUMNS = [f.name for f in fields(EpochRow)]
CONFIG_COLUMNS = ["data_name", "backbone_type", "norm_type", "batch_size"]  # the original's name of a run
RESULT_COLUMNS = ["world_size", "peak_lr", "init_images_used", "epochs_done", "status", "params_m", "flops",
                  "best_top1", "best_top5", "final_top1", "final_top5", "device", "git_commit", "torch_version",
                  "cuda_version"]
DONE = ("finished", "diverged")  # statuses that are results: never trained again
SPELLED_OUT = 3  # a name spells out at most this many flags that differ from the defaults, else a hash


# -----------------------------------------------------------------------------
# names and provenance

def _spell(flag: str, value) -> str:
    if isinstance(value, bool):
        return flag if value else f"no_{flag}"
    return f"{flag}{value:g}" if isinstance(value, float) else f"{flag}{value}"


def run_name(recipe: dict, defaults: dict) -> str:
    """cifar10_resnet18_wn_32 for the default recipe, as the original names its files; then the flags that
    differ from their defaults, in the parser's order (cifar10_resnet18_wn_32_seed1), or, where more than
    SPELLED_OUT differ, a short hash of them. recipe: {flag: value} of every defining flag."""
    differ = {k: v for k, v in recipe.items() if k not in CONFIG_COLUMNS and v != defaults.get(k)}
    head = "_".join(str(recipe[c]) for c in CONFIG_COLUMNS)
    if len(differ) > SPELLED_OUT:
        return f"{head}_{hashlib.sha1(json.dumps(differ, sort_keys=True).encode()).hexdigest()[:8]}"
    return "_".join([head, *(_spell(k, v) for k, v in differ.items())])


def legacy_name(row) -> str:
    """The name a summary.csv row without a `name` column had: its configuration alone."""
    return "_".join(str(row[c]) for c in CONFIG_COLUMNS)


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
# files written whole or not at all

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: mkstemp makes files 0600, and results are for reading by others too


def os_error(e: BaseException) -> Optional[OSError]:
    """The OSError behind e, if any: e itself, or one it was raised from or while handling. torch.save and
    matplotlib wrap a full disk's OSError in errors of their own."""
    while e is not None and not isinstance(e, OSError):
        e = e.__cause__ or e.__context__
    return e


def replace(path: Path, write) -> None:
    """write(tmp) to a temporary file of a unique name beside path, then rename it over path: a crash never
    leaves half a file, two writers never share a temporary file, and a failed write (a full disk, a folder
    that cannot be written) removes its temporary file and says so in one line. The one way every tool writes
    a results file."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        cause = os_error(e) if isinstance(e, Exception) else None  # not KeyboardInterrupt, SystemExit
        if cause is not None:
            raise UserError(f"cannot write {path} ({cause.strerror or type(cause).__name__}); the files written "
                            f"before it are left as they were: free space or pick another folder, then run "
                            f"again") from None
        raise


def save_torch(obj, path: Path) -> None:
    """torch.save through a Python file, whose OSError (a full disk) torch keeps as the cause of its own error."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
    replace(path, write)


def write_csv(df: pd.DataFrame, path: Path) -> None:
    replace(path, lambda tmp: df.to_csv(tmp, index=False))


def write_json(obj, path: Path) -> None:
    replace(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


def write_text(text: str, path: Path) -> None:
    replace(path, lambda tmp: tmp.write_text(text))


def read_csv(path: Path, required: list, **kwargs) -> pd.DataFrame:
    """A results CSV, or one line naming the file when it cannot be read or lacks a required column."""
    try:
        df = pd.read_csv(path, **kwargs)
    except Exception as e:  # EmptyDataError, ParserError, UnicodeDecodeError, OSError: the file is bad
        raise UserError(f"cannot read {path} ({type(e).__name__}); it is left as it is: move it away or "
                        f"repair it") from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise UserError(f"{path} lacks the columns {', '.join(missing)}; it is left as it is: move it away or "
                        f"repair it")
    return df


def read_json(path: Path) -> dict:
    try:
        saved = json.loads(path.read_text())
    except (ValueError, OSError) as e:
        raise UserError(f"cannot read {path} ({type(e).__name__}); it is left as it is: move it away or "
                        f"repair it") from None
    if not isinstance(saved, dict):
        raise UserError(f"{path} holds a JSON {type(saved).__name__}, not a run's arguments; it is left as it "
                        f"is: move it away or repair it")
    return saved


def read_torch(path: Path, device, what: str) -> dict:
    try:
        saved = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # a truncated or foreign file: say which, do not guess
        raise UserError(f"cannot read {what} {path} ({type(e).__name__}); move it away to start the run over") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("args"), dict):
        raise UserError(f"{path} is not a {what} of this tool; move it away to start the run over")
    return saved


def make_results_dir(path) -> None:
    """--results_dir, made if absent, and refused in one line where no file can be written there."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise UserError(f"cannot write to --results_dir {path} ({e.strerror}); pick another folder") from None


@contextmanager
def locked(path: Path):
    """An exclusive lock on path, for read-modify-write of a file that several processes share."""
    try:
        f = open(path, "a")
    except OSError as e:  # a folder that cannot be written (report.py --rebuild_summary on another's results)
        raise UserError(f"cannot write {path} ({e.strerror}); pick a folder that can be written") from None
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# -----------------------------------------------------------------------------
# summary.csv: an index, one row per run, matched by name

def read_summary(path: Path, **kwargs) -> pd.DataFrame:
    """summary.csv with a `name` column (derived for files written before runs had one); empty if absent.
    Columns a user added are kept."""
    if not path.exists():
        return pd.DataFrame(columns=["name"])
    df = read_csv(path, CONFIG_COLUMNS + ["status"], **kwargs)
    if "name" not in df.columns:
        df.insert(0, "name", [legacy_name(row) for _, row in df.iterrows()])
    return df


def write_summary_row(summary: Path, row: dict) -> None:
    """Insert or replace the row of row["name"]. Runs of a sweep share the file, so the read, the change and
    the write happen under one lock. Every cell is read and written as text: nothing is retyped."""
    with locked(summary.with_name(".summary.csv.lock")):
        old = read_summary(summary, dtype=str, keep_default_na=False)
        new = pd.DataFrame([{k: "" if v is None else str(v) for k, v in row.items()}])
        matches = old.index[old.name == row["name"]]
        if len(matches):
            columns = list(dict.fromkeys([*old.columns, *new.columns]))
            old = old.reindex(columns=columns, fill_value="")
            old.loc[matches[0], list(new.columns)] = new.iloc[0].to_numpy()
            old = old.drop(index=matches[1:])
        else:
            old = pd.concat([old, new], ignore_index=True).fillna("")
        write_csv(old, summary)


def summary_row(saved: dict, epochs: pd.DataFrame, recipe: list) -> dict:
    """A run's summary row, from its args.json (`saved`) and its statistics; recipe: the defining flags."""
    row = {"name": saved.get("name"), **{k: saved.get(k) for k in recipe}, **{k: saved.get(k) for k in RESULT_COLUMNS}}
    row.update(epochs_done=len(epochs), device=saved.get("device_name", saved.get("device")),
               params_m=round(saved["params"] / 1e6, 2) if "params" in saved else None, flops=saved.get("flops"))
    if len(epochs):
        best = epochs.loc[epochs.test_top1.idxmax()]
        row.update(best_top1=best.test_top1, best_top5=best.test_top5, final_top1=epochs.test_top1.iloc[-1],
                   final_top5=epochs.test_top5.iloc[-1])
    return row


# -----------------------------------------------------------------------------
# the record of one run

class RunRecord:
    """Every file of one run, and the events that write them: start, end_epoch, finish, diverge, interrupt.
    Used as a context manager, it holds the run's lock: one process trains a run. With enabled=False (DDP ranks
    other than 0) it reads but never writes or locks, so the training loop needs no rank checks.

    defaults: {flag: parser default} of every flag that defines a run; renamed: {old flag: new flag}, for files
    written before a flag was renamed. head: the args.json being written: every flag as used, with world_size,
    data_fingerprint, params, flops and provenance."""

    def __init__(self, results_dir: str, name: str, defaults: dict, enabled: bool = True,
                 keep_checkpoint: bool = False, renamed: Optional[dict] = None):
        self.dir, self.name, self.defaults, self.renamed = Path(results_dir), name, defaults, renamed or {}
        self.enabled, self.keep_checkpoint = enabled, keep_checkpoint
        self.statistics, self.layers_csv = self.dir / f"{name}_statistics.csv", self.dir / f"{name}_layers.csv"
        self.args, self.checkpoint = self.dir / f"{name}_args.json", self.dir / f"{name}_checkpoint.pth"
        self.weights, self.summary = self.dir / f"{name}_model.pth", self.dir / "summary.csv"
        self.lock = self.dir / f".{name}.lock"
        self.head, self.epochs, self.layers, self._lock_file = None, [], [], None

    def __enter__(self) -> "RunRecord":
        if self.enabled:
            make_results_dir(self.dir)
            read_summary(self.summary)  # a bad summary.csv stops the run now, not after its first epoch
            self._lock_file = self._acquire()
        return self

    def _acquire(self):
        """The run's lock file, locked. Its holder removes it on exit, so a process that locked a file just
        removed tries again on the new one (the file at the path is the one that counts)."""
        while True:
            f = open(self.lock, "a+")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "?"
                f.close()
                raise UserError(f"{self.name} is being trained by another process (pid {holder}) in {self.dir}; "
                                f"wait for it to end, or stop it and resume") from None
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

    def saved(self) -> Optional[dict]:
        """The run's head: args.json, or where that is gone, the arguments its checkpoint or weights carry."""
        if self.args.exists():
            return self._current(read_json(self.args))
        for path, what in ((self.checkpoint, "checkpoint"), (self.weights, "weights file")):
            if path.exists():
                return self._current(read_torch(path, "cpu", what)["args"])
        if self.statistics.exists():
            raise UserError(f"{self.statistics} has no {self.args.name}, checkpoint or weights beside it, so "
                            f"nothing says how it was made; move {self.dir / self.name}_* away to train it again")
        return None

    def _current(self, saved: dict) -> dict:
        """saved, with today's names for renamed flags."""
        return {self.renamed.get(k, k): v for k, v in saved.items()}

    def status(self) -> Optional[str]:
        """finished, diverged or incomplete, from the run's files; None if it has none."""
        saved = self.saved()
        if saved is None:
            self._check_listed()
            return None
        status = saved.get("status") or ("finished" if self.weights.exists() else "incomplete")
        missing = [p.name for p in (self.statistics, self.weights) if not p.exists()]
        if status == "finished" and missing:
            raise UserError(f"{self.name} finished, but its {' and '.join(missing)} are missing from {self.dir}; "
                            f"restore them, or move {self.dir / self.name}_* away to train it again")
        return status

    def _check_listed(self) -> None:
        """Refuses a run that summary.csv lists as a result but whose files are all gone: training it anew would
        replace that row without a word."""
        if not self.summary.exists():
            return
        listed = read_summary(self.summary, dtype=str, keep_default_na=False)
        status = listed.status[listed.name == self.name]
        if len(status) and status.iloc[0] in DONE:
            raise UserError(f"{self.summary} says {self.name} is {status.iloc[0]}, but its files are gone from "
                            f"{self.dir}; restore them, or delete its row from summary.csv to train it again")

    def check(self, current: dict, saved: Optional[dict] = None, source=None) -> None:
        """Refuses, in one line, to go on with a run whose saved head differs from `current` in a flag that
        defines it, the number of processes or the data. A value of None in `current` is not known yet."""
        saved = self.saved() if saved is None else saved
        for key in [*self.defaults, "world_size", "data_fingerprint"]:
            now, then = current.get(key), saved.get(key, self.defaults.get(key))
            if now is None or then is None or now == then:
                continue
            what = {"world_size": "the number of processes",
                    "data_fingerprint": f"the data under --data_path {current.get('data_path')}"}.get(key, f"--{key}")
            raise UserError(f"{what} is {now}, but {source or self.args} says {then}; {self.name} cannot go on "
                            f"with it: use the same {what.split(' under ')[0]}, or another --results_dir")

    # -------------------------------------------------------------------------
    # events

    def start(self, head: dict, resume: bool, device, restore=lambda state: state):
        """Writes args.json for a new or resumed run. Returns restore(state) of the trainer's state to resume from
        (its checkpoint's, checked to be this run's), or None to start from the first step. restore runs before
        anything is written, so that a state it refuses leaves the run's files as they were."""
        checkpoint = read_torch(self.checkpoint, device, "checkpoint") if resume and self.checkpoint.exists() else None
        if checkpoint is not None and (checkpoint["args"].get("name") != self.name or "state" not in checkpoint):
            raise UserError(f"{self.checkpoint} is another run's checkpoint ({checkpoint['args'].get('name')}); "
                            f"move it away to start {self.name} over")
        saved = self.saved() if resume else None
        if saved is not None:
            self.check(head, saved)
        state = None
        if checkpoint is not None:
            self.check(head, self._current(checkpoint["args"]), self.checkpoint)
            state = restore(checkpoint["state"])
            self.epochs = [EpochRow(**row) for row in checkpoint["history"]]
            self.layers = checkpoint["layer_history"]
        self.head = {**head, "status": "incomplete", "epochs_done": len(self.epochs)}
        if self.enabled:
            write_json(self.head, self.args)
        return state

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
            save_torch({"model": weights, "args": final}, self.weights)
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

    def restore_summary(self) -> None:
        """This run's summary row, rewritten from its files (after summary.csv was edited or moved away)."""
        if self.enabled:
            stats = read_csv(self.statistics, EPOCH_COLUMNS)
            row = summary_row({"name": self.name, **self.saved()}, stats, list(self.defaults))
            write_summary_row(self.summary, row)

    # -------------------------------------------------------------------------

    def _add(self, row: EpochRow, layer_rows: list) -> None:
        self.epochs.append(row)
        self.layers.extend(layer_rows)

    def _save_checkpoint(self, state: dict) -> None:
        if self.enabled:
            saved = {"state": state, "history": [asdict(r) for r in self.epochs], "layer_history": self.layers,
                     "args": self.head}
            save_torch(saved, self.checkpoint)

    def _write(self, status: str) -> None:
        """The CSVs, then args.json with the status: the moment the files say what happened."""
        self.head = {**self.head, "status": status, "epochs_done": len(self.epochs)}
        if not self.enabled:
            return
        stats = pd.DataFrame([asdict(r) for r in self.epochs], columns=EPOCH_COLUMNS)
        write_csv(stats, self.statistics)
        if self.layers:
            write_csv(pd.DataFrame(self.layers, columns=LAYER_COLUMNS), self.layers_csv)
        write_json(self.head, self.args)
        write_summary_row(self.summary, summary_row(self.head, stats, list(self.defaults)))


def rebuild_summary(results_dir: Path, defaults: dict) -> int:
    """summary.csv rows for every run in results_dir with an args.json, from their own files; the number of runs."""
    names = sorted(p.name[:-len("_args.json")] for p in Path(results_dir).glob("*_args.json"))
    for name in names:
        RunRecord(results_dir, name, defaults).restore_summary()
    return len(names)
