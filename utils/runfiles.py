"""Every file of a run: the CSV columns, declared once; atomic writes; summary.csv shared under a lock."""
import fcntl
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import torch

from utils.cli import UserError
from utils.layerstats import LAYER_COLUMNS

EPOCH_COLUMNS = ["epoch", "lr", "train_loss", "train_top1", "test_loss", "test_top1", "test_top5", "seconds"]
CONFIG_COLUMNS = ["data_name", "backbone_type", "norm_type", "batch_size"]  # they name the run
RECIPE_COLUMNS = ["optimizer", "lr", "weight_decay", "lr_schedule", "warmup_epochs", "epochs", "seed", "subset",
                  "width"]  # how it was made, beside its name
RUN_COLUMNS = CONFIG_COLUMNS + RECIPE_COLUMNS
SUMMARY_COLUMNS = RUN_COLUMNS + ["epochs_done", "status", "params_m", "flops", "best_top1", "best_top5",
                                 "final_top1", "final_top5", "world_size", "device"]
DONE = ("finished", "diverged")  # statuses a resume leaves alone


def run_name(row) -> str:
    """cifar10_resnet18_bn_32: the configuration, from args or a summary row."""
    return "_".join(str(row[c] if isinstance(row, dict) else getattr(row, c)) for c in CONFIG_COLUMNS)


def _replace(path: Path, write) -> None:
    """Write whole to a temporary name, then rename: a crash never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def write_csv(df: pd.DataFrame, path: Path) -> None:
    _replace(path, lambda tmp: df.to_csv(tmp, index=False))


def read_csv(path: Path, required: list) -> pd.DataFrame:
    """A results CSV, or one line naming the file when it cannot be read or lacks a required column."""
    try:
        df = pd.read_csv(path)
    except Exception as e:  # EmptyDataError, ParserError, UnicodeDecodeError, OSError: the file is bad
        raise UserError(f"cannot read {path} ({type(e).__name__}); it is left as it is: move it away or "
                        f"repair it") from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise UserError(f"{path} lacks the columns {', '.join(missing)}; it is left as it is: move it away or "
                        f"repair it")
    return df


def read_summary(path: Path) -> pd.DataFrame:
    """summary.csv with every column of SUMMARY_COLUMNS (empty where an older file lacks one)."""
    if not path.exists():
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    return read_csv(path, CONFIG_COLUMNS + ["status"]).reindex(columns=SUMMARY_COLUMNS)


def _same_config(df: pd.DataFrame, row: dict) -> pd.Series:
    return (df[CONFIG_COLUMNS].astype(str) == pd.Series({c: str(row[c]) for c in CONFIG_COLUMNS})).all(axis=1)


@contextmanager
def locked(path: Path):
    """An exclusive lock on path, for read-modify-write of a file that several processes share."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class RunFiles:
    """Every file of one run, under results_dir. With enabled=False (DDP ranks other than 0) the writing
    methods do nothing, so the training loop needs no rank checks."""

    def __init__(self, results_dir: str, run_args: dict, enabled: bool = True):
        self.dir, self.name, self.enabled = Path(results_dir), run_name(run_args), enabled
        self.config = {c: run_args[c] for c in CONFIG_COLUMNS}
        self.statistics = self.dir / f"{self.name}_statistics.csv"
        self.layers = self.dir / f"{self.name}_layers.csv"
        self.args = self.dir / f"{self.name}_args.json"
        self.checkpoint = self.dir / f"{self.name}_checkpoint.pth"
        self.weights = self.dir / f"{self.name}_model.pth"
        self.summary = self.dir / "summary.csv"
        if enabled:
            self._check_writable()

    def _check_writable(self) -> None:
        try:
            os.makedirs(self.dir, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.dir):
                pass
        except OSError as e:
            raise UserError(f"cannot write to --results_dir {self.dir} ({e.strerror}); pick another folder") from None

    def check_resume(self, run_args: dict, resumable: set):
        """This configuration's status in summary.csv (or None). Refuses to clobber earlier results without
        --resume, and to resume them, finished or not, with a flag outside `resumable` changed."""
        status = self.status()
        if not run_args["resume"]:
            if self.started() or status:
                raise UserError(f"{self.name} already has results in {self.dir}; pass --resume to continue "
                                f"it (or skip it if it is done), or choose another --results_dir")
            return status
        for key, saved in (self.saved_args() or {}).items():
            if key not in resumable and run_args.get(key) != saved:
                flag = "the number of processes" if key == "world_size" else f"--{key}"
                raise UserError(f"{flag} is {run_args.get(key)} but {self.args} says {saved}; resume with the "
                                f"same {flag}, or choose another --results_dir")
        return status

    def status(self):
        """This configuration's status in summary.csv, or None if it has no row."""
        summary = read_summary(self.summary)
        rows = summary[_same_config(summary, self.config)]
        return rows.status.iloc[0] if len(rows) else None

    def saved_args(self):
        """The run's args.json, or None if it has none."""
        if not self.args.exists():
            return None
        try:
            return json.loads(self.args.read_text())
        except (ValueError, OSError) as e:
            raise UserError(f"cannot read {self.args} ({type(e).__name__}); it is left as it is: move it away "
                            f"or repair it") from None

    def started(self) -> bool:
        return self.statistics.exists() or self.checkpoint.exists() or self.weights.exists()

    def load_checkpoint(self, device: torch.device):
        if not self.checkpoint.exists():
            return None
        try:
            return torch.load(self.checkpoint, map_location=device, weights_only=False)
        except Exception as e:  # a truncated or foreign file: say which, do not guess
            raise UserError(f"cannot read checkpoint {self.checkpoint} ({type(e).__name__}); "
                            f"delete it to start the run over") from None

    def save_checkpoint(self, state: dict) -> None:
        if self.enabled:
            _replace(self.checkpoint, lambda tmp: torch.save(state, tmp))

    def drop_checkpoint(self) -> None:
        if self.enabled:
            self.checkpoint.unlink(missing_ok=True)

    def save_weights(self, state: dict) -> None:
        if self.enabled:
            _replace(self.weights, lambda tmp: torch.save(state, tmp))

    def write_args(self, run_args: dict) -> None:
        if self.enabled:
            _replace(self.args, lambda tmp: tmp.write_text(json.dumps(run_args, indent=2) + "\n"))

    def write_history(self, epochs: list, layers: list) -> None:
        """statistics.csv, and layers.csv if there are layer statistics."""
        if self.enabled:
            write_csv(pd.DataFrame(epochs, columns=EPOCH_COLUMNS), self.statistics)
            if layers:
                write_csv(pd.DataFrame(layers, columns=LAYER_COLUMNS), self.layers)

    def write_summary(self, row: dict) -> None:
        """Insert or replace this configuration's row in summary.csv. Runs of a sweep share the file, so the
        read, the change and the write happen under one lock: no update is lost to another's."""
        if self.enabled:
            with locked(self.dir / ".summary.csv.lock"):
                old = read_summary(self.summary)
                new = pd.concat([old[~_same_config(old, row)], pd.DataFrame([row], columns=SUMMARY_COLUMNS)],
                                ignore_index=True)
                write_csv(new.sort_values(CONFIG_COLUMNS, ignore_index=True), self.summary)


class Journal:
    """A run's record: its rows of statistics.csv and layers.csv so far, with what the summary row says
    besides them (`summary`: params_m, flops, device). save() writes the checkpoint before the CSVs, so
    that the CSVs never run ahead of what a resume restores, and the final weights before the summary says
    "finished"."""

    def __init__(self, files: RunFiles, run_args: dict, summary: dict, checkpoint=None):
        self.files, self.run_args = files, run_args
        self.epochs, self.layers = (checkpoint["history"], checkpoint["layer_history"]) if checkpoint else ([], [])
        self.summary = {**{c: run_args[c] for c in RUN_COLUMNS}, "world_size": run_args["world_size"], **summary}

    def save(self, status: str, checkpoint=None, weights=None) -> None:
        if checkpoint is not None:
            self.files.save_checkpoint({**checkpoint, "history": self.epochs, "layer_history": self.layers,
                                        "args": self.run_args})
        if weights is not None:
            self.files.save_weights({"model": weights, "args": self.run_args})
        self.files.write_history(self.epochs, self.layers)
        row = {**self.summary, "epochs_done": len(self.epochs), "status": status}
        if self.epochs:
            best = max(self.epochs, key=lambda r: r["test_top1"])
            row.update(best_top1=best["test_top1"], best_top5=best["test_top5"],
                       final_top1=self.epochs[-1]["test_top1"], final_top5=self.epochs[-1]["test_top5"])
        self.files.write_summary(row)
        if status == "finished" and checkpoint is None:  # a finished run needs only its weights (--keep_checkpoint)
            self.files.drop_checkpoint()
