"""Seeds and statistics: the peak lr scaled with the global batch, the report's final-epoch means and standard
deviations over seeds, Welch's confidence intervals between norms, and older summary.csv files."""
import json
import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import scipy.stats

import cls
import report
from conftest import run_cls_here, write_cifar
from utils import plots
from utils.runfiles import EPOCH_COLUMNS

# -----------------------------------------------------------------------------
# --lr_scaling


@pytest.mark.parametrize("scaling,batch,world,factor", [
    ("none", 128, 1, 1.0), ("linear", 128, 1, 4.0), ("sqrt", 128, 1, 2.0), ("linear", 8, 1, 0.25),
    ("sqrt", 8, 1, 0.5), ("linear", 64, 2, 4.0), ("sqrt", 64, 8, 4.0), ("none", 64, 8, 1.0)])
def test_peak_lr_is_lr_times_the_global_batch_over_the_base_to_the_power(scaling, batch, world, factor):
    args = SimpleNamespace(lr=1e-3, batch_size=batch, lr_scaling=scaling, lr_base_batch=32)
    assert cls.peak_lr(args, world) == pytest.approx(1e-3 * factor, rel=1e-12)


def test_sqrt_scaling_trains_batch_128_at_twice_the_lr_of_base_batch_32(tmp_path, capsys):
    data = write_cifar(tmp_path / "data", "cifar10", n_train=26)  # 130 training images: one batch of 128
    status, _, err = run_cls_here(capsys, "--data_path", str(data), "--batch_size", "128", "--lr_scaling", "sqrt",
                                  "--lr_base_batch", "32", "--warmup_epochs", "0", "--epochs", "1",
                                  "--results_dir", str(tmp_path / "results"))
    assert status == 0, err
    (path,) = (tmp_path / "results").glob("*_statistics.csv")
    stats = pd.read_csv(path)
    assert stats.lr.tolist() == [pytest.approx(2e-3, rel=1e-12)]  # epoch 1 starts at the peak without warmup
    saved = json.loads(next((tmp_path / "results").glob("*_args.json")).read_text())
    assert (saved["lr"], saved["lr_scaling"], saved["peak_lr"]) == (1e-3, "sqrt", pytest.approx(2e-3, rel=1e-12))


# -----------------------------------------------------------------------------
# Welch's interval


def test_welch_interval_equals_the_formula_with_equal_variances():
    # Both sides n = 3 and variance 1: se = sqrt(1/3 + 1/3); Welch-Satterthwaite df = (2/3)^2 / (2 (1/3)^2 / 2)
    # = 4, whose two-sided 95% quantile is t(0.975, 4) = 2.776445 (any t table).
    a, b = [90.0, 91.0, 92.0], [86.0, 87.0, 88.0]
    half = 2.776445 * math.sqrt(2 / 3)
    assert report.welch_interval(a, b) == pytest.approx((4 - half, 4 + half), abs=1e-5)
    assert scipy.stats.t.ppf(0.975, 4) == pytest.approx(2.776445, abs=1e-6)
    low, high = report.welch_interval([88.0, 89.0, 90.0], b)
    assert low == pytest.approx(2 - half, abs=1e-5) and low < 0 < high


def test_welch_interval_uses_the_welch_satterthwaite_degrees_of_freedom():
    a, b = [70.0, 72.0, 71.0, 75.0], [69.0, 69.5]
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)  # squared standard errors
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = scipy.stats.t.ppf(0.975, df) * math.sqrt(va + vb)
    diff = np.mean(a) - np.mean(b)
    assert report.welch_interval(a, b) == pytest.approx((diff - half, diff + half), rel=1e-9)
    assert 2 < df < 4  # neither the pooled test's 4 nor the smaller side's 1


def test_welch_interval_needs_two_seeds_on_each_side_and_takes_seeds_that_agree():
    assert report.welch_interval([90.0], [88.0, 89.0]) is None and report.welch_interval([90.0, 91.0], [88.0]) is None
    # one side without spread: se = sqrt(0 + 0.5 / 2) = 0.5, df = 1, t(0.975, 1) = 12.706205
    assert report.welch_interval([90.0, 90.0], [88.0, 89.0]) == pytest.approx((1.5 - 6.353102, 1.5 + 6.353102))


# -----------------------------------------------------------------------------
# the report over seeds: 2 norms x 2 seeds, and a third seed that diverged

# test top-1 (top-5) of epochs 1-3 for each run: the best epoch is never the last, so a best-epoch headline fails
RUNS = {("bn", 0): ([60.0, 92.5, 90.0], [95.0, 99.25, 99.0]), ("bn", 1): ([61.0, 93.0, 91.0], [95.5, 99.5, 99.5]),
        ("wn", 0): ([55.0, 88.0, 85.0], [94.0, 98.5, 98.0]), ("wn", 1): ([56.0, 87.5, 86.0], [94.5, 99.0, 98.75]),
        ("wn", 2): ([50.0], [90.0])}
DIVERGED = ("wn", 2)


def run_name(norm, seed):
    return f"cifar10_resnet18_{norm}_32" + (f"_seed{seed}" if seed else "")


def write_run(results, norm, seed, top1, top5) -> dict:
    """A run's statistics.csv, and its summary row as the run's record writes it: a name, every defining flag,
    and the results of its epochs."""
    stats = pd.DataFrame({"epoch": range(1, len(top1) + 1), "lr": 1e-3, "train_loss": 1.0, "train_top1": 50.0,
                          "test_loss": 0.5, "test_top1": top1, "test_top5": top5, "seconds": 9.0},
                         columns=EPOCH_COLUMNS)
    stats.to_csv(results / f"{run_name(norm, seed)}_statistics.csv", index=False)
    args = vars(cls.make_parser().parse_args(["--norm_type", norm, "--seed", str(seed), "--epochs", "3"]))
    best = stats.loc[stats.test_top1.idxmax()]
    return {"name": run_name(norm, seed), **{f: args[f] for f in cls.DEFINING_FLAGS}, "epochs_done": len(stats),
            "status": "diverged" if (norm, seed) == DIVERGED else "finished", "params_m": 11.17,
            "flops": 556670000, "best_top1": best.test_top1, "best_top5": best.test_top5,
            "final_top1": stats.test_top1.iloc[-1], "final_top5": stats.test_top5.iloc[-1], "world_size": 1,
            "device": "cpu"}


def table_rows(text):
    return {row[2]: row for row in ([c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines()
                                    if line.startswith("| CIFAR10"))}


@pytest.fixture
def seeded(tmp_path, monkeypatch):
    """The report of RUNS, with the figures it drew: {file name: figure's axes}, read as they are saved."""
    rows = [write_run(tmp_path, norm, seed, *values) for (norm, seed), values in RUNS.items()]
    pd.DataFrame(rows).to_csv(tmp_path / "summary.csv", index=False)
    figures, save = {}, plots._save

    def keep(fig, path, **kwargs):
        figures[path.name] = fig.axes
        save(fig, path, **kwargs)
    monkeypatch.setattr(plots, "_save", keep)
    report.main(["--results_dir", str(tmp_path), "--min_epochs", "3"])
    return SimpleNamespace(results=tmp_path, figures=figures, text=(tmp_path / "results.md").read_text(),
                           comparisons=(tmp_path / "comparisons.md").read_text())


def statistics(results, norm, column):
    """column of every finished seed of norm, read from the statistics CSVs: [[epoch 1, epoch 2, ...], ...]."""
    return [pd.read_csv(results / f"{run_name(n, s)}_statistics.csv")[column].tolist() for n, s in RUNS
            if n == norm and (n, s) != DIVERGED]


def test_report_shows_the_mean_std_and_n_of_the_final_epoch_over_seeds(seeded):
    rows = table_rows(seeded.text)
    assert set(rows) == {"BN", "WN"}  # one row per norm, the seeds together
    for label, norm in (("BN", "bn"), ("WN", "wn")):
        cells = rows[label]
        for cell, column in ((cells[6], "test_top1"), (cells[7], "test_top5")):
            final = [epochs[-1] for epochs in statistics(seeded.results, norm, column)]
            assert cell == f"{np.mean(final):.2f} ± {np.std(final, ddof=1):.2f}"
        top1 = statistics(seeded.results, norm, "test_top1")
        best, final = np.mean([max(epochs) for epochs in top1]), np.mean([epochs[-1] for epochs in top1])
        assert cells[11] == f"{best:.2f}" and best > final  # the best epoch in its own column, not the headline
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
    assert sorted(p.name for p in (seeded.results / "curves").glob("*.png")) == \
        ["cifar10_resnet18_bn_32.png", "cifar10_resnet18_wn_32.png"]
    top1, _ = seeded.figures["cifar10_resnet18_wn_32.png"]
    assert len(top1.lines) == 4  # three seeds, thin, and their mean
    assert top1.lines[-1].get_ydata().tolist() == pytest.approx([np.mean([55, 56, 50]), 87.75, 85.5])


def test_seeds_that_agree_on_both_sides_give_no_interval(tmp_path):
    rows = [write_run(tmp_path, norm, seed, [10.0, 10.0, 10.0], [50.0, 50.0, 50.0]) for norm in ("bn", "in")
            for seed in (0, 1)]  # chance on CIFAR-10, every seed: a zero-width interval would claim certainty
    pd.DataFrame(rows).to_csv(tmp_path / "summary.csv", index=False)
    report.main(["--results_dir", str(tmp_path), "--min_epochs", "3"])
    assert "| IN (2) | BN (2) | +0.00 | no spread, no interval | - |" in (tmp_path / "comparisons.md").read_text()


# -----------------------------------------------------------------------------
# an older summary.csv: some recipe columns, no name

OLD_SUMMARY = """\
data_name,backbone_type,norm_type,batch_size,optimizer,lr,weight_decay,lr_schedule,warmup_epochs,epochs,seed,\
subset,width,epochs_done,status,params_m,flops,best_top1,best_top5,final_top1,final_top5,world_size,device
cifar10,resnet18,bn,32,adamw,0.001,0.05,cosine,1.0,8,0,5000,16,8,finished,0.7,35663232,56.12,95.08,55.64,95.06,1,cpu
cifar10,resnet18,wn,32,adamw,0.001,0.05,cosine,1.0,8,0,5000,16,8,finished,0.7,35048832,45.22,92.92,45.22,92.92,1,cpu
"""


def test_an_older_summary_csv_still_reports(tmp_path):
    (tmp_path / "summary.csv").write_text(OLD_SUMMARY)
    pd.DataFrame({c: [1] for c in EPOCH_COLUMNS}).to_csv(tmp_path / "cifar10_resnet18_wn_32_statistics.csv",
                                                          index=False)
    report.main(["--results_dir", str(tmp_path)])
    assert "Left out: 2 run(s) on a --subset" in (tmp_path / "results.md").read_text()
    report.main(["--results_dir", str(tmp_path), "--all"])
    rows = table_rows((tmp_path / "results.md").read_text())
    assert [rows["BN"][c] for c in (6, 7, 8, 11, 12, 13)] == \
        ["55.64", "95.06", "1", "56.12", "8 / 90", "**--width 16**, **--subset 5000**"]
    assert rows["WN"][6] == "45.22"
    comparisons = (tmp_path / "comparisons.md").read_text()
    assert "| WN (1) | BN (1) | -10.42 | n = 1, no interval | - |" in comparisons
    assert [p.name for p in (tmp_path / "curves").glob("*.png")] == ["cifar10_resnet18_wn_32.png"]  # the old name
