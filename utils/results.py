"""The runs of a results folder, as report.py and sweep.py read them: each from its own files, and counted as a
result only where those files agree. summary.csv is an index derived from them, written anew each time and
never read back.

A finished run is counted where its args.json says finished (or its weights do), its statistics.csv holds
every epoch from 1 to --epochs once, every cell a finite number, and its model.pth, where it is there (results
are committed without weights), holds the same statistics. Every other run is listed with why not: one that
has not finished an epoch, one whose files disagree or cannot be read, a second copy of a run."""
from pathlib import Path

import numpy as np
import pandas as pd

from recipe import IDENTITY, Context
from utils.cli import UserError
from utils.files import read_json, read_torch, write_csv
from utils.record import EPOCH_COLUMNS, RECIPE, VAL_COLUMNS, RunRecord, runs

RESULT_COLUMNS = ["status", "epochs_done", "best_top1", "best_top5", "best_on", "final_top1", "final_top5",
                  "final_val_top1", "params_m", "flops",
                  "peak_lr", "init_images_used", "data_fingerprint", "train_images", "device", "device_name",
                  "git_commit", "torch_version", "cuda_version", "weights"]
SUMMARY_COLUMNS = ["name", "seed", *IDENTITY, *RESULT_COLUMNS]


class Skipped(Exception):
    """A run that is left out, and why: its message names it."""


def statistics(record: RunRecord) -> pd.DataFrame:
    """The run's statistics.csv, every epoch once from 1 and every cell a finite number, or Skipped. The
    validation columns are empty without --val_images, and absent from the files of versions before it."""
    try:
        epochs = pd.read_csv(record.statistics)
    except FileNotFoundError:
        return pd.DataFrame(columns=EPOCH_COLUMNS)
    except Exception as e:  # EmptyDataError, ParserError, UnicodeDecodeError, OSError: the file is bad
        raise Skipped(f"cannot read {record.statistics} ({type(e).__name__})") from None
    if list(epochs.columns) not in (EPOCH_COLUMNS, EPOCH_COLUMNS[:-len(VAL_COLUMNS)]):
        raise Skipped(f"{record.statistics} has the columns {', '.join(map(str, epochs.columns))}, not "
                      f"{', '.join(EPOCH_COLUMNS)}")
    numbers = epochs.apply(pd.to_numeric, errors="coerce").reindex(columns=EPOCH_COLUMNS)
    measured = EPOCH_COLUMNS if record.recipe.val_images else EPOCH_COLUMNS[:-len(VAL_COLUMNS)]
    if not np.isfinite(numbers[measured].to_numpy(dtype=float)).all() or \
            not (record.recipe.val_images or numbers[VAL_COLUMNS].isna().all().all()):
        raise Skipped(f"{record.statistics} has a cell that is not a finite number, or a validation cell without "
                      f"--val_images")
    if numbers.epoch.tolist() != list(range(1, len(numbers) + 1)):
        raise Skipped(f"{record.statistics} has the epochs {numbers.epoch.astype(int).tolist()}, not 1 to "
                      f"{len(numbers)} once each")
    return numbers


def read_run(record: RunRecord) -> dict:
    """The run's summary row, from its own files; Skipped where they cannot count."""
    try:
        head = record.own(read_json(record.args), record.args) if record.args.exists() else None
        weights = read_torch(record.weights, "weights file") if record.weights.exists() else None
        if weights is not None:
            record.own(weights["head"], record.weights)
    except UserError as e:
        raise Skipped(str(e)) from None
    if head is None:
        raise Skipped(f"{record.dir} has no args.json: started, or not a run's folder")
    epochs = statistics(record)
    history = weights.get("history") if weights else None
    status = "finished" if weights else head.get("status", "incomplete")
    if epochs.empty and status != "diverged":
        raise Skipped(f"{record.name} has not finished an epoch yet")
    if status == "finished":
        agree(record, head, epochs, history)
    return row(record, head, epochs, status, weights is not None)


def agree(record: RunRecord, head: dict, epochs: pd.DataFrame, history) -> None:
    """Refuses (Skipped) a finished run whose files disagree on what it trained."""
    if len(epochs) != record.recipe.epochs:
        raise Skipped(f"{record.name} says it finished, but its statistics.csv has {len(epochs)} of "
                      f"{record.recipe.epochs} epochs")
    if head.get("status") != "finished" or head.get("epochs_done") != len(epochs):
        raise Skipped(f"{record.name}: its model.pth says it finished, but its args.json says "
                      f"{head.get('status')} after {head.get('epochs_done')} epochs; restore args.json")
    if history is not None:
        kept = pd.DataFrame(history, columns=EPOCH_COLUMNS).to_numpy(dtype=float)
        if kept.shape != epochs.shape or not np.allclose(kept, epochs.to_numpy(dtype=float), rtol=1e-12, atol=0,
                                                         equal_nan=True):
            raise Skipped(f"{record.statistics} differs from the statistics its model.pth holds; restore it")


def row(record: RunRecord, head: dict, epochs: pd.DataFrame, status: str, weights: bool) -> dict:
    out = {"name": record.name, "seed": record.seed, **record.recipe.to_json(), "status": status,
           "epochs_done": len(epochs), **{k: head.get(k) for k in RESULT_COLUMNS if k in head and k != "status"},
           "params_m": round(head["params"] / 1e6, 2) if head.get("params") else None, "weights": weights}
    if len(epochs):  # the best epoch picked on the validation split, where the run has one
        best_on = "val" if record.recipe.val_images else "test"
        best = epochs.loc[epochs[f"{best_on}_top1"].idxmax()]
        out.update(best_top1=best.test_top1, best_top5=best.test_top5, best_on=best_on,
                   final_top1=epochs.test_top1.iloc[-1], final_top5=epochs.test_top5.iloc[-1],
                   final_val_top1=epochs.val_top1.iloc[-1])
    return out


def read_results(results_dir) -> tuple:
    """(one summary row per run, as a DataFrame with SUMMARY_COLUMNS and the Recipe of each row in `recipe`,
    [a line for every run left out]). A recipe and seed found in two folders counts once, the first."""
    rows, skipped, seen = [], [], {}
    for folder, recipe, seeds in runs(results_dir):
        if recipe is None:
            skipped.append(f"{folder / RECIPE} is not a recipe this tool reads; its runs are left out")
            continue
        for seed_dir in seeds:
            seed = seed_dir.name[len("seed"):]
            if not seed.isdigit():
                skipped.append(f"{seed_dir} is not a seed's folder (seed0, seed1, ...); left out")
                continue
            record = RunRecord(folder, recipe, int(seed))
            if (recipe, int(seed)) in seen:
                skipped.append(f"{record.name} is {seen[recipe, int(seed)]} again, a copy; counted once")
                continue
            try:
                rows.append({**read_run(record), "recipe": recipe})
                seen[recipe, int(seed)] = record.name
            except Skipped as e:
                skipped.append(f"{e}; left out")
    df = pd.DataFrame(rows, columns=[*SUMMARY_COLUMNS, "recipe"])
    return df, skipped


def write_summary(results_dir, df: pd.DataFrame) -> Path:
    """summary.csv: one row per run, derived from the runs' files."""
    path = Path(results_dir) / "summary.csv"
    write_csv(df[SUMMARY_COLUMNS], path)
    return path


def context_of(run: pd.Series) -> Context:
    """The context a run's recipe was resolved in, as its files record it."""
    device = str(run.device) if isinstance(run.device, str) else "cpu"
    return Context(device.split(":")[0], int(run.world_size), int(run.train_images) if pd.notna(run.train_images)
                   else 0)
