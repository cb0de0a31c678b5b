"""Every figure report.py draws: top-1 against batch size, per-run curves, per-run layer heatmaps, the
signal-propagation plots, and architecture.png. Labels come in as arguments: this module knows no registry."""
from pathlib import Path

import matplotlib
import matplotlib.colors
import matplotlib.patches
import matplotlib.ticker

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from utils.cli import UserError  # noqa: E402
from utils.files import replace  # noqa: E402


def _save(fig, path: Path, dpi: int = 110, tight: bool = True, **savefig) -> None:
    """The figure to path, its folder made if absent, through files.replace (whole or not at all), in the
    format of path's suffix (png without one)."""
    kind = path.suffix[1:].lower() or "png"
    try:
        if kind not in fig.canvas.get_supported_filetypes():
            raise UserError(f"cannot draw {path}: matplotlib writes {', '.join(fig.canvas.get_supported_filetypes())} "
                            f"files, not .{kind}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot make the folder {path.parent} ({e.strerror}); pick another path") from None
        if tight:
            fig.tight_layout()
        replace(path, lambda tmp: fig.savefig(tmp, format=kind, dpi=dpi, **savefig))
    finally:
        plt.close(fig)


def rank(key, labels: dict) -> tuple:
    """Where key sorts among labels' keys (a registry's, in its order); a key it does not know, as a run from a
    fork brings, after them by name. The one order, and colour, of norms and backbones in every plot and table."""
    return (list(labels).index(key), "") if key in labels else (len(labels), str(key))


def _series_label(row: pd.Series) -> str:
    """What sets a line apart from the others of its norm: data, epochs and the flags that differ."""
    return f"{row.Data}, {row.epochs:g} epochs" + ("" if row.flag_text == "defaults" else f", {row.flag_text}")


def top1_vs_batch_size(groups: pd.DataFrame, labels: dict, path: Path) -> None:
    """One panel per backbone, one line per norm and recipe: the mean final-epoch top-1 over the finished
    seeds against batch size, with error bars of ± the sample standard deviation, and n in the legend; the
    original's numbers dashed. groups: report.aggregate's rows, one per seed group (top1_mean, top1_std, n,
    series, which with norm_type keys a line, flag_text, original_top1); labels: {"norm": {key: label},
    "backbone": {key: label}}, in the registries' order."""
    done = groups[groups.n > 0]
    panels = sorted(done.backbone_type.unique(), key=lambda b: rank(b, labels["backbone"]))
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(max(7.0, 4.5 * len(panels)), 4.0), squeeze=False)
    norms = sorted({*labels["norm"], *done.norm_type}, key=lambda n: rank(n, labels["norm"]))  # one colour each
    for ax, backbone in zip(axes[0], panels, strict=False):
        rows = done[done.backbone_type == backbone]
        recipes = list(dict.fromkeys(_series_label(r) for _, r in rows.iterrows()))
        drawn = set()  # norms whose original line is drawn
        for _, line in rows.groupby(["norm_type", "series"], sort=False):
            line = line.sort_values("batch_size")
            first = line.iloc[0]
            colour = f"C{norms.index(first.norm_type)}"
            label = labels["norm"].get(first.norm_type, first.norm_type)
            recipe = recipes.index(_series_label(first))
            n = "-".join(str(k) for k in sorted({line.n.min(), line.n.max()}))  # "3", or "2-3" where it varies
            name = f"{label}, {_series_label(first)}" if len(recipes) > 1 else label
            ax.errorbar(line.batch_size, line.top1_mean, yerr=line.top1_std.fillna(0), fmt="os^Dv"[recipe % 5] + "-",
                        color=colour, capsize=3, label=f"{name} (n = {n})")
            original = line.dropna(subset=["original_top1"])
            if len(original) and first.norm_type not in drawn:
                drawn.add(first.norm_type)
                ax.plot(original.batch_size, original.original_top1, "x--", color=colour, alpha=0.6,
                        label=f"{label} (original)")
        ax.set_xscale("log", base=2)
        sizes = sorted(rows.batch_size.unique())
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.minorticks_off()
        title = labels["backbone"].get(backbone, backbone) + (f", {recipes[0]}" if len(recipes) == 1 else "")
        ax.set(title=title, xlabel="batch size", ylabel="final test top-1 (%), mean ± std over seeds")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _save(fig, path, dpi=120)


def curves(runs: dict, name: str, path: Path) -> None:
    """Test top-1 and train loss against epoch for the seeds of one run: each seed a thin line and their mean
    (at each epoch, over the seeds that reached it) a thick one. runs: {label: its statistics.csv rows}."""
    fig, (top1, loss) = plt.subplots(1, 2, figsize=(8, 3.2))
    mean = pd.concat(runs.values()).groupby("epoch")[["test_top1", "train_loss"]].mean()
    for ax, column, colour in ((top1, "test_top1", "C0"), (loss, "train_loss", "C1")):
        if len(runs) > 1:
            for i, stats in enumerate(runs.values()):
                ax.plot(stats.epoch, stats[column], "-", color=colour, lw=0.8, alpha=0.45,
                        label=", ".join(runs) if i == 0 else None)
        ax.plot(mean.index, mean[column], "o-", color=colour, lw=2,
                label=f"mean of {len(runs)} seeds" if len(runs) > 1 else next(iter(runs)))
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.legend(fontsize=7)
    top1.set(xlabel="epoch", ylabel="test top-1 (%)", title=name)
    loss.set(xlabel="epoch", ylabel="train loss")
    _save(fig, path, dpi=100)


LAYER_PANELS = {"grad_norm": "gradient norm on the probe batch", "rel_change": "||Δw|| / ||w|| since the last epoch"}


def layer_heatmaps(layers: pd.DataFrame, name: str, path: Path) -> None:
    """For one run's layers.csv: layer (rows, in forward order) x epoch, for each of LAYER_PANELS, with a
    log colour scale, so that one layer whose step size or gradient runs away stands out."""
    weights = layers[layers.kind != "block"]
    order = list(dict.fromkeys(weights.layer))
    fig, axes = plt.subplots(1, len(LAYER_PANELS), figsize=(11, 2.5 + 0.16 * len(order)), squeeze=False)
    for ax, (column, title) in zip(axes[0], LAYER_PANELS.items()):
        grid = weights.pivot(index="layer", columns="epoch", values=column).reindex(order)
        values = grid.to_numpy(dtype=float)
        positive = values[np.isfinite(values) & (values > 0)]
        norm = matplotlib.colors.LogNorm(positive.min(), positive.max()) if positive.size else None
        image = ax.imshow(np.where(values > 0, values, np.nan), aspect="auto", interpolation="nearest",
                          cmap="viridis", norm=norm)
        ax.set_yticks(range(len(order)), order, fontsize=6)
        epochs = list(grid.columns)
        ax.set_xticks(range(len(epochs)), [str(e) for e in epochs], fontsize=7)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(12, integer=True))
        ax.set(xlabel="epoch", title=title)
        fig.colorbar(image, ax=ax)
    fig.suptitle(name)
    _save(fig, path)


def signal_propagation(group: dict, title: str, path: Path) -> None:
    """Activation std at the output of the stem and of every residual block, against depth, at the first
    (dashed) and the last epoch (solid) of each run, one colour per norm. group: {label: layers.csv rows}."""
    fig, ax = plt.subplots(figsize=(9, 4.2))
    names = []
    for i, (label, layers) in enumerate(group.items()):
        blocks = layers[layers.kind == "block"]
        for epoch, style in ((blocks.epoch.min(), "--"), (blocks.epoch.max(), "-")):
            rows = blocks[blocks.epoch == epoch]
            names = names if len(names) >= len(rows) else list(rows.layer)
            ax.plot(range(len(rows)), rows.act_std, style, marker="o", markersize=3, color=f"C{i}",
                    label=f"{label}, epoch {epoch}")
    ax.set_yscale("log")
    ax.set_xticks(range(len(names)), names, rotation=60, fontsize=7)
    ax.set(ylabel="activation std on the probe batch", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    _save(fig, path)


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
            ("wn_mbn", "conv: w = g * v / ||v||", WN_CONV, "mean-only BN:\nx - batch mean + bias", NORM_LAYER),
            ("ws_gn", "conv: w = (v - μ) / σ", WN_CONV, "GroupNorm: per image,\n32 channel groups", NORM_LAYER),
            ("sws", "conv: w = γ gain (v - μ)\n/ (σ √fan_in) + bias", WN_CONV,
             "no norm layer: scaled\nweight standardization", OTHER)]
    for i, (name, conv, conv_colour, norm, norm_colour) in enumerate(rows):
        y = 49 - 6.5 * i
        ax.text(68, y, name, fontsize=10, weight="bold", va="center")
        _box(ax, 87, y, 17, 5.5, conv, conv_colour, size=8.5)
        _arrow(ax, 96.5, y, 101.5, y)
        _box(ax, 112, y, 19, 5.5, norm, norm_colour, size=8.5)
    ax.text(68, 2.5, "||v||, μ and σ over all dims but the output channel; g, gain and bias: one per output "
            "channel", fontsize=8.5)
    _save(fig, path, dpi=130, tight=False, bbox_inches="tight")
