"""Seeds and statistics: the peak lr scaled with the global batch, the report's final-epoch means and standard
deviations over seeds, and Welch's confidence intervals between norms."""
import json
import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import scipy.stats

import report
from conftest import fake_run, record_of, run_cls_here, write_cifar
from recipe import DEFAULTS, Context, Recipe
from utils import plots
from utils.comparisons import welch_interval

# -----------------------------------------------------------------------------
# --lr_scaling


@pytest.mark.parametrize("scaling,batch,world,factor", [
    ("none", 128, 1, 1.0), ("linear", 128, 1, 4.0), ("sqrt", 128, 1, 2.0), ("linear", 8, 1, 0.25),
    ("sqrt", 8, 1, 0.5), ("linear", 64, 2, 4.0), ("sqrt", 64, 8, 4.0), ("none", 64, 8, 1.0)])
def test_peak_lr_is_lr_times_the_global_batch_over_the_base_to_the_power(scaling, batch, world, factor):
    flags = dict(DEFAULTS, lr=1e-3, batch_size=batch, lr_scaling=scaling, lr_base_batch=32)
    assert Recipe.resolve(flags, Context("cpu", world, 40)).peak_lr() == pytest.approx(1e-3 * factor, rel=1e-12)


def test_sqrt_scaling_trains_batch_128_at_twice_the_lr_of_base_batch_32(tmp_path, capsys):
    data = write_cifar(tmp_path / "data", "cifar10", n_train=26)  # 130 training images: one batch of 128
    flags = ["--data_path", str(data), "--batch_size", "128", "--lr_scaling", "sqrt", "--lr_base_batch", "32",
             "--warmup_epochs", "0", "--epochs", "1"]
    status, _, err = run_cls_here(capsys, *flags, "--results_dir", str(tmp_path / "results"))
    assert status == 0, err
    record = record_of(tmp_path / "results", *flags)
    assert pd.read_csv(record.statistics).lr.tolist() == [pytest.approx(2e-3, rel=1e-12)]  # the peak, no warmup
    saved = json.loads(record.args.read_text())
    assert (saved["recipe"]["lr"], saved["recipe"]["lr_scaling"], saved["peak_lr"]) == \
        (1e-3, "sqrt", pytest.approx(2e-3, rel=1e-12))


# -----------------------------------------------------------------------------
# Welch's interval


def test_welch_interval_equals_the_formula_with_equal_variances():
    # Both sides n = 3 and variance 1: se = sqrt(1/3 + 1/3); Welch-Satterthwaite df = (2/3)^2 / (2 (1/3)^2 / 2)
    # = 4, whose two-sided 95% quantile is t(0.975, 4) = 2.776445 (any t table).
    a, b = [90.0, 91.0, 92.0], [86.0, 87.0, 88.0]
    half = 2.776445 * math.sqrt(2 / 3)
    assert welch_interval(a, b) == pytest.approx((4 - half, 4 + half), abs=1e-5)
    assert scipy.stats.t.ppf(0.975, 4) == pytest.approx(2.776445, abs=1e-6)
    low, high = welch_interval([88.0, 89.0, 90.0], b)
    assert low == pytest.approx(2 - half, abs=1e-5) and low < 0 < high


def test_welch_interval_uses_the_welch_satterthwaite_degrees_of_freedom():
    a, b = [70.0, 72.0, 71.0, 75.0], [69.0, 69.5]
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)  # squared standard errors
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = scipy.stats.t.ppf(0.975, df) * math.sqrt(va + vb)
    diff = np.mean(a) - np.mean(b)
    assert welch_interval(a, b) == pytest.approx((diff - half, diff + half), rel=1e-9)
    assert 2 < df < 4  # neither the pooled test's 4 nor the smaller side's 1


def test_welch_interval_needs_two_seeds_on_each_side_and_takes_seeds_that_agree():
    assert welch_interval([90.0], [88.0, 89.0]) is None and welch_interval([90.0, 91.0], [88.0]) is None
    # one side without spread: se = sqrt(0 + 0.5 / 2) = 0.5, df = 1, t(0.975, 1) = 12.706205
    assert welch_interval([90.0, 90.0], [88.0, 89.0]) == pytest.approx((1.5 - 6.353102, 1.5 + 6.353102))


# -----------------------------------------------------------------------------
# the report over seeds: 2 norms x 2 seeds, and a third seed that diverged

# test top-1 (top-5) of epochs 1-3 for each run: the best epoch is never the last, so a best-epoch headline fails
RUNS = {("bn", 0): ([60.0, 92.5, 90.0], [95.0, 99.25, 99.0]), ("bn", 1): ([61.0, 93.0, 91.0], [95.5, 99.5, 99.5]),
        ("wn", 0): ([55.0, 88.0, 85.0], [94.0, 98.5, 98.0]), ("wn", 1): ([56.0, 87.5, 86.0], [94.5, 99.0, 98.75]),
        ("wn", 2): ([50.0], [90.0])}
DIVERGED = ("wn", 2)


def write_runs(results) -> dict:
    """RUNS as run folders, as cls.py writes them: {(norm, seed): record}."""
    return {(norm, seed): fake_run(results, ["--norm_type", norm, "--seed", str(seed), "--epochs", "3"], top1, top5,
                                   status="diverged" if (norm, seed) == DIVERGED else "finished")
            for (norm, seed), (top1, top5) in RUNS.items()}


def table_rows(text):
    return {row[2]: row for row in ([c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines()
                                    if line.startswith("| CIFAR10"))}


@pytest.fixture
def seeded(tmp_path, monkeypatch):
    """The report of RUNS, with the figures it drew: {file name: figure's axes}, read as they are saved."""
    records = write_runs(tmp_path)
    figures, save = {}, plots._save

    def keep(fig, path, **kwargs):
        figures[path.name] = fig.axes
        save(fig, path, **kwargs)
    monkeypatch.setattr(plots, "_save", keep)
    report.main(["--results_dir", str(tmp_path), "--min_epochs", "3"])
    return SimpleNamespace(results=tmp_path, records=records, figures=figures,
                           text=(tmp_path / "results.md").read_text(),
                           comparisons=(tmp_path / "comparisons.md").read_text())


def statistics(records, norm, column):
    """column of every finished seed of norm, read from the statistics CSVs: [[epoch 1, epoch 2, ...], ...]."""
    return [pd.read_csv(record.statistics)[column].tolist() for (n, s), record in records.items()
            if n == norm and (n, s) != DIVERGED]


def test_report_shows_the_mean_std_and_n_of_the_final_epoch_over_seeds(seeded):
    rows = table_rows(seeded.text)
    assert set(rows) == {"BN", "WN"}  # one row per norm, the seeds together
    for label, norm in (("BN", "bn"), ("WN", "wn")):
        cells = rows[label]
        for cell, column in ((cells[6], "test_top1"), (cells[7], "test_top5")):
            final = [epochs[-1] for epochs in statistics(seeded.records, norm, column)]
            assert cell == f"{np.mean(final):.2f} ± {np.std(final, ddof=1):.2f}"
        top1 = statistics(seeded.records, norm, "test_top1")
        best, final = np.mean([max(epochs) for epochs in top1]), np.mean([epochs[-1] for epochs in top1])
        assert cells[11] == f"{best:.2f}, test" and best > final  # the best epoch in its own column, picked on test
    assert rows["BN"][6] == "90.50 ± 0.71" and rows["BN"][8] == "2"  # the same, worked out by hand
    assert rows["WN"][8] == "2 (1 diverged left out)"  # the diverged seed's 50.00 is in no mean
    assert "Left out of the means: 1 run(s) that did not finish (1 diverged, 0 unfinished)" in seeded.text
    assert rows["BN"][9:11] == ["93.17", "99.82"] and rows["WN"][9:11] == ["-", "-"]  # the original's, beside
    assert rows["BN"][12:14] == ["3 / 90", "defaults"]


def test_comparisons_give_welchs_interval_of_the_difference_of_means(seeded):
    # BN 90.0, 91.0 against WN 85.0, 86.0: variance 0.5 each side, n = 2, so df = 2, t(0.975, 2) = 4.302653,
    # se = sqrt(0.5 / 2 + 0.5 / 2) = 0.7071: WN - BN = -5 ± 3.04.
    half = 4.302653 * math.sqrt(0.5)
    line = next(line for line in seeded.comparisons.splitlines() if "| WN (2) | BN (2) |" in line)
    assert line.endswith(f"| -5.00 | [{-5 - half:+.2f}, {-5 + half:+.2f}] | yes |")
    assert line == "| CIFAR10 | ResNet18 | 32 | 3 | defaults | WN (2) | BN (2) | -5.00 | [-8.04, -1.96] | yes |"
    assert seeded.comparisons.count("| WN (2) | BN (2) |") == 2  # against BN, and WN against the others


def test_plots_show_the_spread_and_n_and_one_curve_figure_per_seed_group(seeded):
    (ax,) = seeded.figures["top1_vs_batch_size.png"]
    assert sorted(t.get_text() for t in ax.get_legend().get_texts()) == \
        ["BN (n = 2)", "BN (original)", "WN (n = 2)"]
    bars = {c.get_label(): c for c in ax.containers}
    for label, norm in (("BN (n = 2)", "bn"), ("WN (n = 2)", "wn")):
        (segment,) = bars[label].lines[2][0].get_segments()  # the error bar at batch 32: mean - std to mean + std
        values = [RUNS[(norm, s)][0][-1] for s in (0, 1)]
        assert segment[:, 1] == pytest.approx([np.mean(values) - np.std(values, ddof=1),
                                               np.mean(values) + np.std(values, ddof=1)])
    folders = {norm: record.dir.parent.name for (norm, _), record in seeded.records.items()}
    assert sorted(p.name for p in (seeded.results / "curves").glob("*.png")) == \
        sorted({f"{folder}.png" for folder in folders.values()})
    top1, _ = seeded.figures[f"{folders['wn']}.png"]
    assert len(top1.lines) == 4  # three seeds, thin, and their mean
    assert top1.lines[-1].get_ydata().tolist() == pytest.approx([np.mean([55, 56, 50]), 87.75, 85.5])


def test_seeds_that_agree_on_both_sides_give_no_interval(tmp_path):
    for norm in ("bn", "in"):  # chance on CIFAR-10, every seed: a zero-width interval would claim certainty
        for seed in (0, 1):
            fake_run(tmp_path, ["--norm_type", norm, "--seed", str(seed), "--epochs", "3"], [10.0] * 3, [50.0] * 3)
    report.main(["--results_dir", str(tmp_path), "--min_epochs", "3"])
    assert "| IN (2) | BN (2) | +0.00 | no spread, no interval | - |" in (tmp_path / "comparisons.md").read_text()
