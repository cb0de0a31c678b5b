"""Turn results/ into the README's results table and its plots.

    python report.py                          # results/results.md and the PNGs under results/
    python report.py --readme README.md       # also replace the README's results section with the table
    python report.py --all                    # keep subset and short runs in the table too
    python report.py --architecture architecture.png   # only redraw the architecture figure

Reads summary.csv and the per-run CSVs that cls.py writes, and the original README's table
(results/original_readme.csv). Writes, under --results_dir:
    results.md                   the table in the original's format, with the original's numbers beside ours
    top1_vs_batch_size.png       top-1 against batch size, one line per norm, one panel per backbone
    curves/{run}.png             test top-1 and train loss against epoch, for every run
    layers/{run}.png             gradient norm and ||Δw||/||w|| per layer and epoch, for every run with layers.csv
    signal/{data}_{backbone}_{batch}.png   activation std across depth, first and last epoch, a line per norm
The table and top1_vs_batch_size.png leave out runs on a --subset, of another --width, or of fewer than
--min_epochs epochs (smoke tests), and say how many they left out.
"""
from utils.cli import exit_on_ctrl_c

if __name__ == "__main__":
    exit_on_ctrl_c("report.py")  # before the imports below, which take seconds (flake8: E402 is meant)

from pathlib import Path

import pandas as pd

from model import MODELS, NORMS
from utils import plots
from utils.cli import ArgumentParser, UserError, positive_int, run_cli
from utils.data import DATASETS
from utils.layerstats import LAYER_COLUMNS
from utils.metrics import human
from utils.runfiles import EPOCH_COLUMNS, read_csv, read_summary


LABELS = {"data": {k: d.label for k, d in DATASETS.items()}, "backbone": {k: m.label for k, m in MODELS.items()},
          "norm": {k: n.label for k, n in NORMS.items()}}
ORIGINAL_EPOCHS = 90
README_MARKERS = ("<!-- report.py: begin -->", "<!-- report.py: end -->")


def load(results: Path) -> pd.DataFrame:
    """Our summary rows, labelled, joined with the original README's row for the same configuration."""
    ours = read_summary(results / "summary.csv")
    ours = ours.assign(**{column: ours[key].map(lambda k, kind=kind: LABELS[kind].get(k, k)) for column, key, kind in
                          (("Data", "data_name", "data"), ("Backbone", "backbone_type", "backbone"),
                           ("Norm Type", "norm_type", "norm"))}, **{"Batch Size": ours.batch_size.astype(int)})
    original = read_csv(Path(__file__).parent / "results" / "original_readme.csv", ["Top1 Acc (%)", "Top5 Acc (%)"])
    original = original.rename(columns={"Top1 Acc (%)": "original_top1", "Top5 Acc (%)": "original_top5"})
    for column in ("original_top1", "original_top5"):  # "-" where the original has no number
        original[column] = pd.to_numeric(original[column], errors="coerce")
    keys = ["Data", "Backbone", "Norm Type", "Batch Size"]
    return ours.merge(original[keys + ["original_top1", "original_top5"]], on=keys, how="left")


def is_result(df: pd.DataFrame, min_epochs: int) -> pd.Series:
    """Runs that may stand beside the original's: the whole dataset, the papers' width, enough epochs.
    Rows of an older summary.csv, without these columns, count as results."""
    return ((df.subset.fillna(0) == 0) & (df.width.fillna(64) == 64) & (df.epochs.fillna(min_epochs) >= min_epochs))


def accuracy(row: pd.Series, column: str) -> str:
    if row.status == "diverged":
        return "diverged"
    if pd.isna(row[column]):
        return "-"
    value = f"{row[column]:.2f}"
    return value if row.status == "finished" else f"{value} ({row.epochs_done}/{row.epochs} epochs)"


def recipe(row: pd.Series) -> str:
    """How the run was made, beside its numbers; a subset or a narrower net said out loud."""
    if pd.isna(row.optimizer):
        return "-"
    text = (f"{row.optimizer} lr {row.lr:g} wd {row.weight_decay:g}, {row.lr_schedule}, warmup {row.warmup_epochs:g}, "
            f"seed {row.seed:g}")
    smoke = [f"{name} {row[name]:g}" for name, full in (("subset", 0), ("width", 64)) if row[name] != full]
    return ", ".join([text, *(f"**{s}**" for s in smoke)])


def table(df: pd.DataFrame, left_out: int, min_epochs: int) -> str:
    header = ["Data", "Backbone", "Norm Type", "Batch Size", "Params (M)", "FLOPs", "Top1 Acc (%)", "Top5 Acc (%)",
              "Original Top1 (%)", "Original Top5 (%)", "Epochs (ours / original)", "Recipe", "Device"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, r in df.sort_values(["data_name", "backbone_type", "norm_type", "batch_size"]).iterrows():
        cells = [r.Data, r.Backbone, r["Norm Type"], r["Batch Size"], f"{r.params_m:.2f}", human(r.flops),
                 accuracy(r, "best_top1"), accuracy(r, "best_top5"),
                 *("-" if pd.isna(r[c]) else f"{r[c]:.2f}" for c in ("original_top1", "original_top5")),
                 f"{r.epochs:g} / {ORIGINAL_EPOCHS}", recipe(r),
                 f"{r.device}" + (f" x{r.world_size:g}" if r.world_size > 1 else "")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    notes = ("Top1/Top5: ours, the test accuracy of the epoch with the best top-1. Original: the original "
             f"README's numbers for the same row (CIFAR-10, {ORIGINAL_EPOCHS} epochs, batch size as given, NVIDIA "
             "Tesla V100), for comparison; '-' where it has none.")
    if left_out:
        notes += (f" Left out: {left_out} run(s) on a --subset, of another --width or of fewer than {min_epochs} "
                  f"epochs (`python report.py --all` keeps them).")
    return "\n".join(lines) + "\n\n" + notes + "\n"


def replace_readme_section(readme: Path, text: str) -> None:
    begin, end = README_MARKERS
    old = readme.read_text()
    if old.count(begin) != 1 or old.count(end) != 1 or old.index(begin) > old.index(end):
        raise UserError(f"{readme} needs one {begin} ... {end} section to replace; it is left as it is")
    head, rest = old.split(begin)
    readme.write_text(f"{head}{begin}\n{text}{end}{rest.split(end, 1)[1]}")


def per_run_plots(results: Path, df: pd.DataFrame) -> None:
    """curves/, layers/ and signal/ for every run that has the CSVs."""
    for folder in ("curves", "layers", "signal"):
        (results / folder).mkdir(exist_ok=True)
    layers = {}
    for _, row in df.iterrows():
        name = row["name"]
        if (results / f"{name}_statistics.csv").exists():
            stats = read_csv(results / f"{name}_statistics.csv", EPOCH_COLUMNS)
            plots.curves(stats, name, results / "curves" / f"{name}.png")
        if (results / f"{name}_layers.csv").exists():
            layers[name] = read_csv(results / f"{name}_layers.csv", LAYER_COLUMNS)
            plots.layer_heatmaps(layers[name], name, results / "layers" / f"{name}.png")
    for (data, backbone, batch), group in df.groupby(["data_name", "backbone_type", "batch_size"]):
        runs = {LABELS["norm"].get(row.norm_type, row.norm_type): layers[name] for _, row in group.iterrows()
                if (name := row["name"]) in layers}
        if runs:
            title = f"{LABELS['backbone'].get(backbone, backbone)}, {data}, batch {batch}: signal propagation"
            plots.signal_propagation(runs, title, results / "signal" / f"{data}_{backbone}_{batch}.png")


def main(argv=None) -> None:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--results_dir", default="results")
    p.add_argument("--readme", default=None, help="a README whose report.py section gets the table")
    p.add_argument("--min_epochs", default=10, type=positive_int, help="shorter runs stay out of the table")
    p.add_argument("--all", action="store_true", help="keep subset, narrow and short runs in the table")
    p.add_argument("--architecture", default=None, help="only draw the architecture figure to this path")
    args = p.parse_args(argv)
    if args.architecture:
        return plots.draw_architecture(Path(args.architecture))
    results = Path(args.results_dir)
    df = load(results)
    if df.empty:
        raise UserError(f"no runs in {results / 'summary.csv'}; run cls.py or sweep.py first")
    shown = df if args.all else df[is_result(df, args.min_epochs)]
    text = table(shown, len(df) - len(shown), args.min_epochs)
    (results / "results.md").write_text(text)
    plots.top1_vs_batch_size(shown, LABELS, results / "top1_vs_batch_size.png")
    per_run_plots(results, df)
    if args.readme:
        replace_readme_section(Path(args.readme), text)
    print(f"wrote {results / 'results.md'} ({len(shown)} runs in the table, {len(df) - len(shown)} left out) "
          f"and the plots")


if __name__ == "__main__":
    run_cli(main, "report.py")
