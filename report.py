"""Turn results/ into the README's results table and its plots.

    python report.py                          # results/results.md and the PNGs under results/
    python report.py --readme README.md       # also replace the README's results section with the table
    python report.py --architecture architecture.png   # only redraw the architecture figure

Reads summary.csv and the per-run statistics CSVs that cls.py writes, and the original README's table
(results/original_readme.csv). Writes, under --results_dir:
    results.md                 the table in the original's format, with the original's numbers beside ours
    top1_vs_batch_size.png     top-1 against batch size, one line per norm, one panel per backbone
    curves/{run}.png           test top-1 and train loss against epoch, for every run
"""
import argparse
import re
from pathlib import Path

import matplotlib
import matplotlib.patches
import matplotlib.ticker

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

import utils  # noqa: E402

BACKBONE = {"resnet18": "ResNet18", "resnet34": "ResNet34", "resnet50": "ResNet50", "resnext50": "ResNeXt50"}
NORM = {"bn": "BN", "in": "IN", "wn": "WN", "wn_mbn": "WN+MBN", "gn": "GN"}
DATA = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "imagenet": "ImageNet", "synthetic": "synthetic"}
README_MARKERS = ("<!-- report.py: begin -->", "<!-- report.py: end -->")


def load(results: Path) -> pd.DataFrame:
    """Our summary rows joined with the original README's row for the same configuration, if any."""
    ours = utils.read_summary(results / "summary.csv")
    ours = ours.assign(Data=ours.data_name.map(DATA), Backbone=ours.backbone_type.map(BACKBONE),
                       **{"Norm Type": ours.norm_type.map(NORM), "Batch Size": ours.batch_size.astype(int)})
    original = pd.read_csv(Path(__file__).parent / "results" / "original_readme.csv")
    original = original.rename(columns={"Top1 Acc (%)": "original_top1", "Top5 Acc (%)": "original_top5"})
    for column in ("original_top1", "original_top5"):  # "-" where the original has no number
        original[column] = pd.to_numeric(original[column], errors="coerce")
    keys = ["Data", "Backbone", "Norm Type", "Batch Size"]
    return ours.merge(original[keys + ["original_top1", "original_top5"]], on=keys, how="left")


def accuracy(row: pd.Series, column: str) -> str:
    if row.status == "diverged":
        return "diverged"
    if pd.isna(row[column]):
        return "-"
    value = f"{row[column]:.2f}"
    return value if row.status == "finished" else f"{value} ({row.epochs_done}/{row.epochs} epochs)"


def table(df: pd.DataFrame) -> str:
    header = ["Data", "Backbone", "Norm Type", "Batch Size", "Params (M)", "FLOPs", "Top1 Acc (%)", "Top5 Acc (%)",
              "Original Top1 (%)", "Original Top5 (%)", "Epochs", "Device"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, r in df.sort_values(["data_name", "backbone_type", "norm_type", "batch_size"]).iterrows():
        cells = [r.Data, r.Backbone, r["Norm Type"], r["Batch Size"], f"{r.params_m:.2f}", utils.human(r.flops),
                 accuracy(r, "best_top1"), accuracy(r, "best_top5"),
                 *("-" if pd.isna(r[c]) else f"{r[c]:.2f}" for c in ("original_top1", "original_top5")),
                 r.epochs, f"{r.device}" + (f" x{r.world_size}" if r.world_size > 1 else "")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    notes = ("Top1/Top5: ours, the test accuracy of the epoch with the best top-1. Original: the original "
             "README's numbers for the same row (CIFAR-10, 90 epochs, batch size as given, NVIDIA Tesla V100), "
             "for comparison; '-' where it has none.")
    return "\n".join(lines) + "\n\n" + notes + "\n"


def plot_top1_vs_batch_size(df: pd.DataFrame, path: Path) -> None:
    done = df[df.status != "diverged"].dropna(subset=["best_top1"])
    panels = sorted(done.backbone_type.unique(), key=list(BACKBONE).index)
    n = max(len(panels), 1)
    fig, axes = plt.subplots(1, n, figsize=(max(7.0, 4.5 * n), 4.0), squeeze=False)
    for ax, backbone in zip(axes[0], panels, strict=False):
        rows = done[done.backbone_type == backbone]
        for norm, group in rows.groupby("norm_type"):
            group = group.sort_values("batch_size")
            colour = f"C{list(NORM).index(norm)}"
            ax.plot(group.batch_size, group.best_top1, "o-", color=colour, label=NORM[norm])
            original = group.dropna(subset=["original_top1"])
            if len(original):
                ax.plot(original.batch_size, original.original_top1, "x--", color=colour, alpha=0.6,
                        label=f"{NORM[norm]} (original)")
        ax.set_xscale("log", base=2)
        sizes = sorted(rows.batch_size.unique())
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.minorticks_off()
        ax.set_title(f"{BACKBONE[backbone]}, {', '.join(sorted(rows.Data.unique()))}")
        ax.set_xlabel("batch size")
        ax.set_ylabel("test top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(results: Path, name: str, path: Path) -> None:
    stats = pd.read_csv(results / f"{name}_statistics.csv")
    fig, (top1, loss) = plt.subplots(1, 2, figsize=(8, 3.2))
    top1.plot(stats.epoch, stats.test_top1, "o-")
    top1.set(xlabel="epoch", ylabel="test top-1 (%)", title=name)
    loss.plot(stats.epoch, stats.train_loss, "o-", color="C1")
    loss.set(xlabel="epoch", ylabel="train loss")
    for ax in (top1, loss):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def replace_readme_section(readme: Path, text: str) -> None:
    begin, end = README_MARKERS
    old = readme.read_text()
    if begin not in old or end not in old:
        raise utils.UserError(f"{readme} has no {begin} ... {end} section to replace")
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    readme.write_text(pattern.sub(lambda _: f"{begin}\n{text}{end}", old))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results_dir", default="results")
    p.add_argument("--readme", default=None, help="a README whose report.py section gets the table")
    p.add_argument("--architecture", default=None, help="only draw the architecture figure to this path")
    args = p.parse_args(argv)
    if args.architecture:
        draw_architecture(Path(args.architecture))
        return
    results = Path(args.results_dir)
    df = load(results)
    if df.empty:
        raise SystemExit(f"report.py: error: no runs in {results / 'summary.csv'}; run cls.py or sweep.py first")
    text = table(df)
    (results / "results.md").write_text(text)
    plot_top1_vs_batch_size(df, results / "top1_vs_batch_size.png")
    (results / "curves").mkdir(exist_ok=True)
    for name in df.apply(utils.run_name, axis=1):
        if (results / f"{name}_statistics.csv").exists():
            plot_curves(results, name, results / "curves" / f"{name}.png")
    if args.readme:
        replace_readme_section(Path(args.readme), text)
    print(f"wrote {results / 'results.md'} ({len(df)} runs) and the plots")



# -----------------------------------------------------------------------------
# architecture.png

CONV, NORM_LAYER, WN_CONV, OTHER = "#cfe2f3", "#fce5cd", "#d9ead3", "#eeeeee"


def _box(ax, x, y, w, h, text, colour, size=9):
    ax.add_patch(matplotlib.patches.FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.3",
                                                   facecolor=colour, edgecolor="#555555"))
    ax.text(x, y, text, ha="center", va="center", fontsize=size)


def _arrow(ax, x0, y0, x1, y1):
    ax.annotate("", (x1, y1), (x0, y0), arrowprops=dict(arrowstyle="->", color="#333333"))


def _block(ax, x, top, steps, step=6.2, width=17):
    """A residual block: a vertical chain of (text, colour) boxes from y=top down, with arrows, and the
    shortcut from the first box to the last drawn beside it."""
    y = top
    for i, (text, colour) in enumerate(steps):
        _box(ax, x, y, width, 3.6, text, colour)
        if i:
            _arrow(ax, x, y + step - 2.1, x, y + 2.1)
        y -= step
    right, bottom = x + width / 2 + 0.6, y + step
    ax.plot([right, right + 2.5, right + 2.5], [top, top, bottom], color="#333333", lw=1)
    _arrow(ax, right + 2.5, bottom, right, bottom)
    ax.text(x + width / 2 + 5.2, (top + y + step) / 2, "shortcut: identity, or conv 1x1 + norm\nwhen the shape changes",
            rotation=90, ha="center", va="center", fontsize=7.5)


def draw_architecture(path: Path) -> None:
    """The CIFAR-stem ResNet, its two blocks, and where each norm acts. Rebuilt by report.py --architecture."""
    fig, ax = plt.subplots(figsize=(13, 8))
    ax.set(xlim=(0, 130), ylim=(0, 80))
    ax.axis("off")
    ax.text(2, 77, "ResNet with the CIFAR stem (32x32 input; the ImageNet stem is a 7x7 stride-2 conv and a max-pool)",
            fontsize=12, weight="bold")
    stages = [("image\n3 x 32 x 32", OTHER), ("stem: conv 3x3\n64, norm, ReLU", CONV),
              ("layer1\n64 ch, 32x32", OTHER), ("layer2\n128 ch, 16x16", OTHER), ("layer3\n256 ch, 8x8", OTHER),
              ("layer4\n512 ch, 4x4", OTHER), ("avg pool", OTHER), ("fc\nclasses", CONV)]
    for i, (text, colour) in enumerate(stages):
        _box(ax, 8 + 16 * i, 68, 12, 6, text, colour)
        if i:
            _arrow(ax, 8 + 16 * i - 10.5, 68, 8 + 16 * i - 6.5, 68)
    ax.text(2, 60.5, "blocks per stage: ResNet-18 2-2-2-2 and ResNet-34 3-4-6-3 BasicBlocks; ResNet-50 and "
            "ResNeXt-50 (32x4d) 3-4-6-3 Bottlenecks, with 4x the channels. The first block of layers 2-4 has "
            "stride 2.", fontsize=9)

    ax.text(4, 55, "BasicBlock", fontsize=11, weight="bold")
    _block(ax, 14, 50, [("x", OTHER), ("conv 3x3", CONV), ("norm", NORM_LAYER), ("ReLU", OTHER),
                        ("conv 3x3", CONV), ("norm", NORM_LAYER), ("+  then ReLU", OTHER)])
    ax.text(36, 55, "Bottleneck", fontsize=11, weight="bold")
    _block(ax, 44, 50, [("x", OTHER), ("conv 1x1", CONV), ("norm, ReLU", NORM_LAYER),
                         ("conv 3x3, groups\n(ResNeXt: 32)", CONV), ("norm, ReLU", NORM_LAYER),
                         ("conv 1x1, 4x ch", CONV), ("norm", NORM_LAYER), ("+  then ReLU", OTHER)])

    ax.text(68, 55, "Where each norm acts (--norm_type)", fontsize=11, weight="bold")
    rows = [("bn", "conv: w", CONV, "BatchNorm: per channel,\nover the batch and H x W", NORM_LAYER),
            ("in", "conv: w", CONV, "InstanceNorm: per image\nand channel, over H x W", NORM_LAYER),
            ("gn", "conv: w", CONV, "GroupNorm: per image,\n32 channel groups", NORM_LAYER),
            ("wn", "conv: w = g * v / ||v||\n+ bias", WN_CONV, "no norm layer: WN is a\nreparameterization of w",
             OTHER),
            ("wn_mbn", "conv: w = g * v / ||v||", WN_CONV, "mean-only BN:\nx - batch mean + bias", NORM_LAYER)]
    for i, (name, conv, conv_colour, norm, norm_colour) in enumerate(rows):
        y = 48 - 9 * i
        ax.text(68, y, name, fontsize=10, weight="bold", va="center")
        _box(ax, 87, y, 17, 5.5, conv, conv_colour, size=8.5)
        _arrow(ax, 96.5, y, 101.5, y)
        _box(ax, 112, y, 19, 5.5, norm, norm_colour, size=8.5)
    ax.text(68, 2.5, "||v|| over all dims but the output channel, in float32; g and bias: one per output channel "
            "(Salimans & Kingma 2016)", fontsize=8.5)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    main()
