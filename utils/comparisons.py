"""comparisons.md, every norm against BN and WN against every norm, and tuned.md, each norm at its own best
value of a flag, chosen on the validation split: differences of mean final-epoch test top-1 between seed
groups, with Welch's confidence intervals. The groups are report.aggregate's rows."""
import warnings

import numpy as np
import pandas as pd
import scipy.stats

from model import NORMS
from recipe import PER_NORM
from utils import plots

CONFIDENCE = 0.95


def welch_interval(a, b, confidence: float = CONFIDENCE):
    """(low, high): the confidence interval of mean(a) - mean(b) by Welch's t, which does not assume equal
    variances (the Welch-Satterthwaite degrees of freedom). None with one value on either side: no variance."""
    if min(len(a), len(b)) < 2:
        return None
    with warnings.catch_warnings():  # "precision loss" where a side's seeds agree: a variance of 0 is exact
        warnings.simplefilter("ignore", RuntimeWarning)
        interval = scipy.stats.ttest_ind(a, b, equal_var=False).confidence_interval(confidence)
    return float(interval.low), float(interval.high)


def interval(g: pd.Series, against: pd.Series) -> tuple:
    """(the interval of g's mean final top-1 minus against's as shown, whether it excludes 0: yes, no or -)."""
    if min(g.n, against.n) < 2:
        shown, mark = "n = 1, no interval", "-"
    elif np.ptp(g.top1) == 0 and np.ptp(against.top1) == 0:  # a zero-width interval would claim certainty
        shown, mark = "no spread, no interval", "-"
    else:
        low, high = welch_interval(g.top1, against.top1)
        shown, mark = f"[{low:+.2f}, {high:+.2f}]", "yes" if low > 0 or high < 0 else "no"
    return shown, mark


def comparison_row(g: pd.Series, against: pd.Series) -> list:
    shown, mark = interval(g, against)
    return [g.Data, g.Backbone, g["Batch Size"], f"{g.epochs:g}", g.flag_text, f"{g['Norm Type']} ({g.n})",
            f"{against['Norm Type']} ({against.n})", f"{g.top1_mean - against.top1_mean:+.2f}", shown, mark]


def pairs_against_bn(groups: pd.DataFrame) -> list:
    """(norm, bn) for every norm of every family that has bn."""
    pairs = []
    for _, family in groups.groupby("family", sort=False):
        bn = family[family.norm_type == "bn"]
        pairs += [(g, bn.iloc[0]) for _, g in family.iterrows() if len(bn) and g.norm_type != "bn"]
    return pairs


def pairs_of_wn(groups: pd.DataFrame) -> list:
    """(wn, other) for every other norm, at the smallest and the largest batch size of every series with wn."""
    pairs = []
    for _, series in groups.groupby("series", sort=False):
        wn = series[series.norm_type == "wn"]
        for batch in sorted({wn.batch_size.min(), wn.batch_size.max()}) if len(wn) else []:
            family = series[series.batch_size == batch]
            pairs += [(wn[wn.batch_size == batch].iloc[0], g) for _, g in family.iterrows() if g.norm_type != "wn"]
    return pairs


def comparison_table(pairs: list) -> str:
    header = ["Data", "Backbone", "Batch Size", "Epochs", "Flags", "Norm (n)", "Against (n)",
              "Top-1 difference (points)", f"{CONFIDENCE:.0%} interval", "Excludes 0"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    pairs = sorted(pairs, key=lambda p: (p[0].data_name, p[0].backbone_type, p[0].flag_text, p[0].batch_size,
                                         plots.rank(p[0].norm_type, NORMS), plots.rank(p[1].norm_type, NORMS)))
    lines += ["| " + " | ".join(str(c) for c in comparison_row(g, against)) + " |" for g, against in pairs]
    return "\n".join(lines) if pairs else "None: no pair of norms with finished runs of the same recipe."


def comparisons(groups: pd.DataFrame) -> str:
    done = groups[groups.n > 0]
    return (f"# Comparisons between norms\n\nThe difference of mean final-epoch test top-1 (percentage points), the "
            f"norm minus the one it is against, between seed groups of the same data, backbone, batch size, "
            f"epochs and flags (Flags: those that differ from cls.py's defaults); n: finished seeds. Interval: "
            f"the {CONFIDENCE:.0%} confidence interval of the difference by Welch's t over the seeds "
            f"(scipy.stats.ttest_ind, equal_var=False); none with one seed on either side. Excludes 0: the "
            f"gap is larger than the seed-to-seed spread explains, at this confidence. How to read it: "
            f"docs/statistics.md.\n\n## Every norm against BN\n\n{comparison_table(pairs_against_bn(done))}\n\n"
            f"## WN against every other norm, at its smallest and largest batch size\n\n"
            f"{comparison_table(pairs_of_wn(done))}\n")


# -----------------------------------------------------------------------------
# tuned.md

def choices(groups: pd.DataFrame, flags: list) -> list:
    """[(the seed groups tied for the best mean final validation top-1, every candidate)] for each set of seed
    groups with a validation split that differ only in `flags`: the same recipe otherwise, on the same data."""
    done = groups[(groups.n > 0) & groups.val_mean.notna()]
    key = done.apply(lambda g: f"{g.recipe.key(tuple(flags))}, data {g.data_fingerprint}", axis=1)
    out = []
    for _, candidates in done.groupby(key, sort=False):
        best = candidates.val_mean.round(2).max()  # as shown: a tie the reader sees is a tie
        out.append((candidates[candidates.val_mean.round(2) == best].sort_values(flags), candidates))
    return out


def edge(value, flag: str, candidates: pd.DataFrame) -> str:
    """Where a chosen value lies among those tried: at an end, the best may lie beyond the grid."""
    tried = sorted(set(candidates[flag]), key=lambda v: (v is None, v))
    if len(tried) == 1:
        return " (the only value tried)"
    if not all(isinstance(v, (int, float, np.number)) for v in tried):
        return ""
    if value == tried[-1]:
        return " (edge: the largest tried; extend the grid up)"
    return " (edge: the smallest tried; extend the grid down)" if value == tried[0] else ""


def against_bn(best: pd.DataFrame, bn: pd.DataFrame) -> list:
    """The difference of mean final test top-1 to BN's chosen seed group, and its interval."""
    if best.iloc[0].norm_type == "bn":
        return ["-", "-"]
    if bn is None:
        return ["no tuned BN", "-"]
    if len(best) > 1 or len(bn) > 1:
        return ["a tie: no single value", "-"]
    g, against = best.iloc[0], bn.iloc[0]
    shown, _ = interval(g, against)
    return [f"{g.top1_mean - against.top1_mean:+.2f}", shown]


def shown_value(value) -> str:
    """A flag's value at full precision: two recipes whose lr differs in the tenth digit are two rows, and say so."""
    if isinstance(value, (float, np.floating)):
        return repr(float(value))
    return str(int(value)) if isinstance(value, np.integer) else str(value)


def chosen_cells(best: pd.DataFrame, candidates: pd.DataFrame, flags: list) -> list:
    """Each tuned flag's chosen value, with where it lies among those tried; tied values joined by =."""
    if len(best) > 1:
        return [" = ".join(map(shown_value, best[f])) + " (a tie)" for f in flags]
    return [shown_value(best.iloc[0][f]) + edge(best.iloc[0][f], f, candidates) for f in flags]


def tried_cell(candidates: pd.DataFrame, flags: list) -> str:
    return "; ".join(", ".join(shown_value(c[f]) for f in flags) + f": {c.val_mean:.2f}"
                     for _, c in candidates.sort_values(flags).iterrows())


def other_flags(g: pd.Series, flags: list) -> str:
    """The row's flags that differ from the defaults, but the tuned ones."""
    parts = [p for p in g.flag_text.split(", ") if not any(p.startswith(f"--{f} ") for f in flags)]
    return ", ".join(parts) or "defaults"


def spread(mean: float, std: float, n: int) -> str:
    """A mean over n seeds, with the sample std where there is one."""
    return f"{mean:.2f}" + (f" ± {std:.2f}" if n > 1 else "")


def headline(g: pd.Series, metric: str) -> str:
    """Mean ± sample std over the finished seeds; without one, why not."""
    if g.n == 0:
        if g.diverged:
            return "diverged"
        return "-" if pd.isna(g.epochs_done) else f"- ({g.epochs_done:g}/{g.epochs:g} epochs)"
    return spread(g[f"{metric}_mean"], g[f"{metric}_std"], g.n)


def tuned(groups: pd.DataFrame, flags: list) -> str:
    """tuned.md: each norm at its own best values of `flags`, chosen on the validation split."""
    chosen = sorted(choices(groups, flags), key=lambda c: (c[0].iloc[0].data_name, c[0].iloc[0].backbone_type,
                                                           c[0].iloc[0].batch_size,
                                                           plots.rank(c[0].iloc[0].norm_type, NORMS)))
    family = lambda g: f"{g.recipe.key(('norm_type', *PER_NORM, *flags))}, data {g.data_fingerprint}"  # noqa: E731
    bns = {family(best.iloc[0]): best for best, _ in chosen if best.iloc[0].norm_type == "bn"}
    header = ["Data", "Backbone", "Norm", "Batch Size", *flags, "Val Top1", "Top1 Acc (%)", "Seeds",
              "Tried (val top-1)", "Flags", "Against BN (tuned)", f"{CONFIDENCE:.0%} interval"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for best, candidates in chosen:
        g = best.iloc[0]
        cells = [g.Data, g.Backbone, g["Norm Type"], g["Batch Size"], *chosen_cells(best, candidates, flags),
                 spread(g.val_mean, g.val_std, g.n),
                 " / ".join(headline(b, "top1") for _, b in best.iterrows()), " / ".join(map(str, best.n)),
                 tried_cell(candidates, flags), other_flags(g, flags), *against_bn(best, bns.get(family(g)))]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    left = int(((groups.n > 0) & groups.val_mean.isna()).sum())
    spelled = ", ".join(f"--{f}" for f in flags)
    return (f"# Each norm at its own best {spelled}\n\nFor every data, backbone, batch size and norm (and every "
            f"other flag, on the same data), the value of {spelled} whose seeds end with the best mean top-1 on "
            f"the validation split (--val_images, held out of the training images and never trained on), never "
            f"on the test set. Val Top1: that mean ± std over its seeds, at the final epoch. Top1 Acc: the test "
            f"top-1 at that value, mean ± std over its seeds: the number to report. Tried: every value, with its "
            f"mean validation top-1. Edge: the value chosen is the largest or the smallest tried, so the best may "
            f"lie beyond the grid: extend it. A tie (equal means at two decimals) is shown as a tie, and no single "
            f"value is chosen. Against BN: the norm minus BN, each at its own chosen value, with the "
            f"{CONFIDENCE:.0%} Welch interval of the difference (docs/statistics.md)."
            + (f" Left out: {left} seed group(s) without a validation split." if left else "")
            + "\n\n" + ("\n".join(lines) if chosen else "None: no finished run with a validation split.") + "\n")
