"""Turn results/ into the README's results table, the comparisons between norms, and the plots.

    python report.py                          # results/results.md, comparisons.md and the PNGs under results/
    python report.py --readme README.md       # also replace the README's results section with the table
    python report.py --all                    # keep subset and short runs in the table too
    python report.py --architecture architecture.png   # only redraw the architecture figure
    python report.py --tune lr                # also tuned.md: each norm at its best --lr, chosen on --val_images
    python report.py --migrate                # first move a results folder of older versions into recipe folders

Reads every run's own files under --results_dir, {recipe}/seed{N}/, and counts a run only where they agree
(utils/results.py); a line on stderr names each run it leaves out, and why. The seeds of a recipe, on the same
data, form one row: the mean and sample standard deviation of their final epoch's test accuracy, over the
finished ones (docs/statistics.md). Beside them it reads the original README's table
(results/original_readme.csv). Writes, under --results_dir:
    summary.csv                  one row per run: its recipe, status and results, derived, never read back
    results.md                   the table in the original's format, with the original's numbers beside ours
    comparisons.md               every norm against bn, and wn against every norm at its smallest and largest
                                 batch: the difference of mean final top-1 and its 95% confidence interval
    tuned.md                     with --tune: each norm at the value with its best mean validation top-1, the
                                 test top-1 there, every value tried, and the norm against bn, each tuned
    top1_vs_batch_size.png       final top-1 against batch size, mean ± std over seeds, one line per norm
    curves/{recipe}.png          test top-1 and train loss against epoch: every seed of a recipe, and their mean
    layers/{recipe}/seed{N}.png  gradient norm and ||Δw||/||w|| per layer and epoch, for every run with layers.csv
    signal/{data}_{backbone}_{batch}.png   activation std across depth, first and last epoch, a line per norm
The table, the comparisons and top1_vs_batch_size.png leave out runs on a --subset, of another --width, or
of fewer than --min_epochs epochs (smoke tests), and say how many they left out.
"""
from utils.cli import exit_on_ctrl_c

if __name__ == "__main__":
    exit_on_ctrl_c("report.py")  # before the imports below, which take seconds (flake8: E402 is meant)

import hashlib
import sys
from pathlib import Path

import pandas as pd

from model import MODELS, NORMS
from recipe import HEAD, PER_NORM, RECIPE_FLAGS
from utils import migrate, plots, results as runs_of
from utils.comparisons import comparisons, headline, shown_value, tuned
from utils.cli import ArgumentParser, UserError, positive_int, run_cli
from utils.data import DATASETS
from utils.files import read_csv, write_text
from utils.layerstats import LAYER_COLUMNS
from utils.metrics import human
from utils.record import EPOCH_COLUMNS


LABELS = {"data": {k: d.label for k, d in DATASETS.items()}, "backbone": {k: m.label for k, m in MODELS.items()},
          "norm": {k: n.label for k, n in NORMS.items()}}
ORIGINAL_EPOCHS = 90
TUNABLE = [f for f in RECIPE_FLAGS if f not in (*HEAD, "seed", "val_images")]  # report.py --tune's choices
README_MARKERS = ("<!-- report.py: begin -->", "<!-- report.py: end -->")
OWN_COLUMNS = ("data_name", "backbone_type", "norm_type", "batch_size", "epochs")  # values the table shows
SMOKE_FLAGS = ("subset", "width")  # in bold where they differ from the papers'


# -----------------------------------------------------------------------------
# runs, each read from its own files, and the keys that group them

def flags_text(run: pd.Series, bold: bool = False) -> str:
    """How the run's recipe differs from cls.py's defaults, besides the table's columns: '--lr 0.002, --width
    8'; and the data's fingerprint where its recipe was trained on other data too."""
    differs = run.recipe.differs(runs_of.context_of(run))
    parts = [(f"--{f} {shown_value(v)}" if f != "world_size" else f"{v} processes", f in SMOKE_FLAGS)
             for f, v in differs.items() if f not in OWN_COLUMNS]
    if run.other_data:
        parts.append((f"data {run.data_fingerprint}", False))
    return ", ".join(f"**{text}**" if bold and smoke else text for text, smoke in parts) or "defaults"


def load(results: Path) -> pd.DataFrame:
    """Every run that counts, one row each, labelled and keyed, joined with the original README's row for the
    same configuration; a line on stderr for each run left out. group: the runs of one recipe on one data (the
    seeds of a row); family: those that differ only in the norm; series: only in the norm and the batch size.
    The data's fingerprint is in every key: runs on other images are never pooled."""
    ours, skipped = runs_of.read_results(results)
    for line in skipped:
        print(f"report.py: {line}", file=sys.stderr)
    if ours.empty:
        raise UserError(f"no runs in {results}; run cls.py or sweep.py first")
    ours = ours.assign(**{column: ours[key].map(lambda k, kind=kind: LABELS[kind].get(k, k)) for column, key, kind in
                          (("Data", "data_name", "data"), ("Backbone", "backbone_type", "backbone"),
                           ("Norm Type", "norm_type", "norm"))}, **{"Batch Size": ours.batch_size.astype(int)})
    for column, leave_out in (("group", ()), ("family", ("norm_type", *PER_NORM)),
                              ("series", ("norm_type", "batch_size", *PER_NORM))):
        ours[column] = [f"{r.recipe.key(leave_out)}, data {r.data_fingerprint}" for _, r in ours.iterrows()]
    fingerprints = ours.groupby(ours.recipe.map(lambda r: r.key())).data_fingerprint.transform("nunique")
    ours["other_data"] = fingerprints > 1
    ours["flag_text"] = [flags_text(row) for _, row in ours.iterrows()]
    original = read_csv(Path(__file__).parent / "results" / "original_readme.csv", ["Top1 Acc (%)", "Top5 Acc (%)"])
    original = original.rename(columns={"Top1 Acc (%)": "original_top1", "Top5 Acc (%)": "original_top5"})
    for column in ("original_top1", "original_top5"):  # "-" where the original has no number
        original[column] = pd.to_numeric(original[column], errors="coerce")
    keys = ["Data", "Backbone", "Norm Type", "Batch Size"]
    return ours.merge(original[keys + ["original_top1", "original_top5"]], on=keys, how="left")


def is_result(df: pd.DataFrame, min_epochs: int) -> pd.Series:
    """Runs that may stand beside the original's: the whole dataset, the papers' width, enough epochs."""
    return (df.subset == 0) & (df.width == 64) & (df.epochs >= min_epochs)


# -----------------------------------------------------------------------------
# seeds: one row per group of runs that differ only in --seed

SEED_COLUMNS = ["runs", "seeds", "n", "diverged", "unfinished", "top1", "top1_mean", "top1_std", "top5_mean",
                "top5_std", "best_top1_mean", "val_mean", "val_std", "devices", "commits"]


def device_text(run: pd.Series) -> str:
    return f"{run.device_name}" + (f" x{run.world_size:g}" if run.world_size > 1 else "")


def aggregate(df: pd.DataFrame) -> pd.DataFrame:
    """One row per seed group: the configuration of its lowest seed (its recipe names the group), the names
    and seeds of its runs, and over its finished runs only, n, the final epoch's top-1 (`top1`, a tuple),
    the mean and sample standard deviation (NaN for n = 1) of the final top-1 and top-5 and of the final
    validation top-1 (NaN without a split), the mean best-epoch top-1, and the commits they were made with.
    diverged and unfinished count the runs the means leave out."""
    rows = []
    for _, runs in df.groupby("group", sort=False):
        runs = runs.sort_values("seed")
        done = runs[runs.status == "finished"]
        diverged = int((runs.status == "diverged").sum())
        rows.append({**runs.iloc[0].to_dict(), "runs": tuple(runs["name"]), "seeds": tuple(runs.seed),
                     "n": len(done), "diverged": diverged, "unfinished": len(runs) - len(done) - diverged,
                     "epochs_done": runs.epochs_done.max(), "top1": tuple(done.final_top1),
                     "top1_mean": done.final_top1.mean(), "top1_std": done.final_top1.std(),
                     "top5_mean": done.final_top5.mean(), "top5_std": done.final_top5.std(),
                     "best_top1_mean": done.best_top1.mean(), "val_mean": done.final_val_top1.mean(),
                     "val_std": done.final_val_top1.std(),
                     "devices": ", ".join(dict.fromkeys(device_text(r) for _, r in done.iterrows())),
                     "commits": ", ".join(dict.fromkeys(str(c)[:7] + ("-dirty" if str(c).endswith("-dirty") else "")
                                                        for c in done.git_commit if c))})
    return pd.DataFrame(rows, columns=list(dict.fromkeys([*df.columns, *SEED_COLUMNS])))


def in_order(groups: pd.DataFrame) -> pd.DataFrame:
    return groups.sort_values(["data_name", "backbone_type", "norm_type", "batch_size", "flag_text"], kind="stable")


# -----------------------------------------------------------------------------
# results.md

def seeds_cell(g: pd.Series) -> str:
    out = [f"{k} {what}" for k, what in ((g.diverged, "diverged"), (g.unfinished, "unfinished")) if k]
    return f"{g.n}" + (f" ({', '.join(out)} left out)" if out else "")


def table(groups: pd.DataFrame, left_out: int, min_epochs: int) -> str:
    header = ["Data", "Backbone", "Norm Type", "Batch Size", "Params (M)", "FLOPs", "Top1 Acc (%)", "Top5 Acc (%)",
              "Seeds", "Original Top1 (%)", "Original Top5 (%)", "Best-epoch Top1 (%), picked on",
              "Epochs (ours / original)", "Flags", "Device", "Commit"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, g in in_order(groups).iterrows():
        cells = [g.Data, g.Backbone, g["Norm Type"], g["Batch Size"], f"{g.params_m:.2f}", human(g.flops),
                 headline(g, "top1"), headline(g, "top5"), seeds_cell(g),
                 *("-" if pd.isna(g[c]) else f"{g[c]:.2f}" for c in ("original_top1", "original_top5")),
                 "-" if pd.isna(g.best_top1_mean) else f"{g.best_top1_mean:.2f}, {g.best_on}",
                 f"{g.epochs:g} / {ORIGINAL_EPOCHS}", flags_text(g, bold=True), g.devices or "-", g.commits or "-"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    notes = ("Top1/Top5 Acc: ours, the test accuracy after the final epoch, as mean ± sample standard deviation "
             "over the seeds of a row (runs that differ only in --seed; Seeds: how many, finished runs only). "
             "Best-epoch Top1: the mean test top-1 of each run's best epoch, picked on the validation split "
             "(val) where the row has one (--val_images), else on the test set itself (test), so then an "
             "optimistic number. Original: the original README's numbers for the same row (CIFAR-10, "
             f"{ORIGINAL_EPOCHS} epochs, batch size as given, NVIDIA Tesla V100, one number each), for comparison; "
             "'-' where it has none. Flags: those that differ from cls.py's defaults (`python cls.py --help`). "
             "Commit: the code the seeds were trained with, every commit where they differ. "
             "Differences between norms with confidence intervals: comparisons.md.")
    unfinished = int(groups.diverged.sum() + groups.unfinished.sum())
    if unfinished:
        notes += (f" Left out of the means: {unfinished} run(s) that did not finish ({int(groups.diverged.sum())} "
                  f"diverged, {int(groups.unfinished.sum())} unfinished).")
    if left_out:
        notes += (f" Left out: {left_out} run(s) on a --subset, of another --width or of fewer than {min_epochs} "
                  f"epochs (`python report.py --all` keeps them).")
    return "\n".join(lines) + "\n\n" + notes + "\n"


def readme_around_section(readme: Path) -> tuple:
    """(what comes before the table, what comes after) in the README's report.py section, read before anything
    is written: a README that cannot take the table stops report.py with the results folder as it was."""
    begin, end = README_MARKERS
    try:
        old = readme.read_text()
    except (OSError, UnicodeDecodeError) as e:
        why = getattr(e, "strerror", None) or type(e).__name__
        raise UserError(f"cannot read --readme {readme} ({why}); name a README file with one {begin} ... {end} "
                        f"section, or leave --readme out") from None
    if old.count(begin) != 1 or old.count(end) != 1 or old.index(begin) > old.index(end):
        raise UserError(f"{readme} needs one {begin} ... {end} section to replace; it is left as it is")
    head, rest = old.split(begin)
    return f"{head}{begin}\n", f"{end}{rest.split(end, 1)[1]}"


# -----------------------------------------------------------------------------
# per-run plots

def signal_names(groups: pd.DataFrame) -> dict:
    """{family: file name}: {data}_{backbone}_{batch}, with a hash of the flags where one folder holds
    several recipes of the same data, backbone and batch size."""
    names = {}
    for (data, backbone, batch), same in groups.groupby(["data_name", "backbone_type", "batch_size"]):
        for family in same.family.unique():
            tag = f"_{hashlib.sha1(family.encode()).hexdigest()[:8]}" if same.family.nunique() > 1 else ""
            names[family] = f"{data}_{backbone}_{batch}{tag}"
    return names


def group_name(g: pd.Series) -> str:
    """The recipe's folder, and the data where the recipe was trained on other data too."""
    return g["name"].split("/")[0] + (f"_data{g.data_fingerprint}" if g.other_data else "")


def per_run_plots(results: Path, df: pd.DataFrame) -> None:
    """curves/ for every seed group, layers/ for every run, signal/ for every family (one seed of each norm)."""
    layers = {}
    for name in df["name"]:
        if (results / name / "layers.csv").exists():
            layers[name] = read_csv(results / name / "layers.csv", LAYER_COLUMNS)
            plots.layer_heatmaps(layers[name], name, results / "layers" / f"{name}.png")
    groups = aggregate(df)
    for _, g in groups.iterrows():
        stats = {f"seed {seed:g}": read_csv(results / name / "statistics.csv", EPOCH_COLUMNS)
                 for name, seed in zip(g.runs, g.seeds, strict=True)}
        plots.curves(stats, group_name(g), results / "curves" / f"{group_name(g)}.png")
    names = signal_names(groups)
    for family, same in groups.groupby("family", sort=False):
        runs = {g["Norm Type"]: layers[g["name"]] for _, g in same.iterrows() if g["name"] in layers}
        if runs:
            g = same.iloc[0]
            title = f"{g.Backbone}, {g.data_name}, batch {g.batch_size}, {g.flag_text}: signal propagation"
            plots.signal_propagation(runs, title, results / "signal" / f"{names[family]}.png")


def main(argv=None) -> None:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--results_dir", default="results")
    p.add_argument("--readme", default=None, help="a README whose report.py section gets the table")
    p.add_argument("--min_epochs", default=10, type=positive_int, help="shorter runs stay out of the table")
    p.add_argument("--all", action="store_true", help="keep subset, narrow and short runs in the table")
    p.add_argument("--architecture", default=None, help="only draw the architecture figure to this path")
    p.add_argument("--tune", nargs="+", choices=TUNABLE, metavar="FLAG",
                   help="also write tuned.md: each norm at the value(s) of these recipe flags (lr, weight_decay, "
                        "...) with the best mean validation top-1 over its seeds; needs runs with --val_images")
    p.add_argument("--migrate", action="store_true",
                   help="first move the flat results of versions before recipe folders into {recipe}/seed{N}/ "
                        "(utils/migrate.py)")
    args = p.parse_args(argv)
    if args.architecture:
        return plots.draw_architecture(Path(args.architecture))
    results = Path(args.results_dir)
    around = readme_around_section(Path(args.readme)) if args.readme else None
    if args.migrate:
        moved, left = migrate.migrate(results)
        for line in left:
            print(f"report.py: {line}", file=sys.stderr)
        print(f"moved {moved} runs into recipe folders under {results}" + (f"; {len(left)} left" if left else ""))
    df = load(results)
    shown = df if args.all else df[is_result(df, args.min_epochs)]
    if args.tune and not (shown.val_images > 0).any():
        raise UserError("--tune chooses each value on the validation split, and no run in the table has one (their "
                        "--val_images is 0); train with --val_images N, e.g. python sweep.py --lr 3e-4 1e-3 3e-3 "
                        "--seed 0 1 2 --val_images 5000", exit_code=2)
    runs_of.write_summary(results, df)
    groups = aggregate(shown)
    text = table(groups, len(df) - len(shown), args.min_epochs)
    write_text(text, results / "results.md")
    write_text(comparisons(groups), results / "comparisons.md")
    if args.tune:
        write_text(tuned(groups, args.tune), results / "tuned.md")
    plots.top1_vs_batch_size(groups, LABELS, results / "top1_vs_batch_size.png")
    per_run_plots(results, df)
    if around:
        write_text(f"{around[0]}{text}{around[1]}", Path(args.readme))
    print(f"wrote {results / 'summary.csv'}, {results / 'results.md'} ({len(shown)} runs in {len(groups)} rows, "
          f"{len(df) - len(shown)} left out), {results / 'comparisons.md'} and the plots")


if __name__ == "__main__":
    run_cli(main, "report.py")
