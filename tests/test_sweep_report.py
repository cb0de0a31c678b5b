"""sweep.py runs a grid, one after another or side by side, and skips what is finished; report.py turns the
CSVs into the table and the plots."""
import json
import multiprocessing
import re
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from PIL import Image

import cls
import report
from sweep import parse as parse_sweep
from conftest import ENV, NARROW, ROOT, write_cifar
from utils.metrics import human
from utils.runfiles import write_summary_row


def sweep(*args):
    return subprocess.Popen([sys.executable, str(ROOT / "sweep.py"), *NARROW, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)


def summary_of(results):
    return pd.read_csv(results / "summary.csv") if (results / "summary.csv").exists() else pd.DataFrame()


def wait_until(condition, proc, timeout=300):
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.05)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """A 2x2 sweep, one configuration after another, killed after its second configuration and started again."""
    root = tmp_path_factory.mktemp("sweep")
    data = write_cifar(root / "data", "cifar10", n_train=4, n_test=6)  # 20 train images
    results = root / "results"
    args = ["--norm_type", "bn", "in", "--batch_size", "5", "10", "--epochs", "2", "--data_path", str(data),
            "--results_dir", str(results)]
    first = sweep(*args)
    wait_until(lambda: (summary_of(results).get("status", pd.Series()) == "finished").sum() >= 2, first)
    first.send_signal(signal.SIGKILL)
    first.communicate()
    finished = {p.name: p.read_bytes() for p in results.glob("*_statistics.csv") if pd.read_csv(p).epoch.max() == 2}
    second = sweep(*args)
    out, err = second.communicate(timeout=300)
    assert second.returncode == 0, err[-2000:]
    return results, finished, out


def test_sweep_runs_the_grid_and_skips_finished_configurations_after_an_interruption(swept):
    results, finished, out = swept
    summary = pd.read_csv(results / "summary.csv")
    assert sorted(zip(summary.norm_type, summary.batch_size)) == [("bn", 5), ("bn", 10), ("in", 5), ("in", 10)]
    assert (summary.status == "finished").all() and (summary.epochs_done == 2).all()
    assert len(finished) >= 2 and out.count("already finished") >= 2
    for name, content in finished.items():  # skipped, not run again
        assert (results / name).read_bytes() == content


@pytest.fixture(scope="module")
def parallel(tmp_path_factory, data):
    """bn and in side by side (--jobs 2): stopped by Ctrl-C once both have finished an epoch, started again to
    finish, and started a third time. What each step left behind, for the tests below."""
    results = tmp_path_factory.mktemp("parallel")
    args = ["--norm_type", "bn", "in", "--batch_size", "8", "--jobs", "2", "--epochs", "8", "--data_path",
            str(data), "--results_dir", str(results)]
    names = [cls.parse_args([*NARROW, "--norm_type", norm, "--batch_size", "8", "--epochs", "8"]).name
             for norm in ("bn", "in")]
    first = sweep(*args)
    wait_until(lambda: len(summary_of(results)) == 2, first)  # both have finished an epoch
    first.send_signal(signal.SIGINT)
    out, err = first.communicate(timeout=120)
    checkpoints = [torch.load(results / f"{name}_checkpoint.pth", weights_only=False) for name in names]
    stopped = SimpleNamespace(code=first.returncode, out=out, err=err, summary=summary_of(results),
                              checkpoints=checkpoints)
    second = sweep(*args)
    out, err = second.communicate(timeout=300)
    finished = SimpleNamespace(code=second.returncode, out=out, err=err, summary=summary_of(results),
                               files={p.name: p.read_bytes() for p in results.glob("*.csv")})
    third = sweep(*args)
    out, err = third.communicate(timeout=300)
    again = SimpleNamespace(code=third.returncode, out=out, err=err, summary=summary_of(results),
                            files={p.name: p.read_bytes() for p in results.glob("*.csv")})
    logs = {n: (results / f"{n}.log").read_text() for n in names}
    return SimpleNamespace(stopped=stopped, finished=finished, again=again, logs=logs)


def test_stopping_a_parallel_sweep_stops_both_runs_with_checkpoints_to_resume(parallel):
    stopped = parallel.stopped
    assert stopped.code == 128 + signal.SIGINT and "Traceback" not in stopped.err
    assert "stopped by SIGINT" in stopped.err.strip().splitlines()[-1]
    assert stopped.out.count(": stopped (exit status 130)") == 2  # the sweep waited for both
    assert all(1 < checkpoint["state"]["progress"]["epoch"] <= 8 for checkpoint in parallel.stopped.checkpoints)
    assert (stopped.summary.status == "incomplete").all()
    assert all("resuming" in log for log in parallel.logs.values())  # the second sweep went on from there


def test_two_jobs_write_two_finished_rows(parallel):
    finished = parallel.finished
    assert finished.code == 0 and "2 at a time" in finished.out, finished.err
    assert finished.out.count(": finished (exit status 0)") == 2
    assert sorted(finished.summary.norm_type) == ["bn", "in"]
    assert (finished.summary.status == "finished").all() and (finished.summary.epochs_done == 8).all()
    assert all(log.count("finished: results in") == 1 for log in parallel.logs.values())


def test_a_finished_parallel_sweep_is_skipped_when_run_again(parallel):
    again = parallel.again
    assert again.code == 0 and again.out.count("is already finished") == 2 and "started" not in again.out, again.err
    assert again.files == parallel.finished.files


def test_the_grid_takes_several_values_of_every_defining_flag_with_its_type_and_choices():
    configs, _ = parse_sweep(["--seed", "0", "1", "--norm_type", "bn", "wn", "--lr", "1e-3", "0.001", "--no-bf16",
                              "--residual_scale", "0.5"])
    grid = [(c.args.seed, c.args.norm_type) for c in configs]
    assert sorted(grid) == [(0, "bn"), (0, "wn"), (1, "bn"), (1, "wn")]  # 1e-3 and 0.001 are one run
    assert len({tuple(c.argv) for c in configs}) == 4
    assert all(c.args.lr == 0.001 and c.args.residual_scale == 0.5 and not c.args.bf16 for c in configs)


@pytest.mark.parametrize("flag", ["--residual_scale -1", "--optimizer sgd", "--seed one"])
def test_a_bad_grid_value_stops_the_sweep_before_any_run(flag, capsys):
    with pytest.raises(SystemExit) as e:
        parse_sweep(["--seed", "0", "1", *flag.split()])
    err = capsys.readouterr().err
    assert e.value.code == 2 and flag.split()[0] in err and len(err.strip().splitlines()) == 1


def test_a_grid_over_seeds_writes_a_run_for_each_seed(data, tmp_path):
    proc = sweep("--seed", "0", "1", "--norm_type", "bn", "wn", "--epochs", "1", "--batch_size", "10", "--data_path",
                 str(data), "--results_dir", str(tmp_path))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    runs = [json.loads(p.read_text()) for p in tmp_path.glob("*_args.json")]
    assert sorted((run["seed"], run["norm_type"]) for run in runs) == [(0, "bn"), (0, "wn"), (1, "bn"), (1, "wn")]


def test_the_same_run_asked_for_twice_runs_once(data, tmp_path):
    proc = sweep("--jobs", "2", "--norm_type", "bn", "bn", "--epochs", "1", "--batch_size", "10", "--data_path",
                 str(data), "--results_dir", str(tmp_path))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert out.count("started") == 1 and len(pd.read_csv(tmp_path / "summary.csv")) == 1


def write_rows(results, worker, n):
    for i in range(n):
        row = {"name": f"run{1000 * worker + i}", "data_name": "cifar10", "backbone_type": "resnet18",
               "norm_type": "bn", "batch_size": 1000 * worker + i, "status": "finished"}
        write_summary_row(results / "summary.csv", row)


def test_runs_finishing_together_lose_no_summary_row(tmp_path):
    workers = [multiprocessing.get_context("fork").Process(target=write_rows, args=(tmp_path, w, 15)) for w in (1, 2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
        assert w.exitcode == 0
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert sorted(summary.batch_size) == [1000 * w + i for w in (1, 2) for i in range(15)]


# -----------------------------------------------------------------------------
# report.py

def table_rows(text):
    return [[c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines() if line.startswith("| CIFAR10")]


def test_report_table_equals_the_csvs_and_the_plots_are_pngs(swept):
    results, _, _ = swept
    report.main(["--results_dir", str(results), "--all"])
    rows = table_rows((results / "results.md").read_text())
    summary = pd.read_csv(results / "summary.csv")
    assert len(rows) == len(summary)
    for cells in rows:
        run = summary[(summary.norm_type == {"BN": "bn", "IN": "in"}[cells[2]]) &
                      (summary.batch_size == int(cells[3]))].iloc[0]
        assert cells[4] == f"{run.params_m:.2f}" and cells[5] == human(run.flops)
        # one seed: the final epoch's accuracy, no spread; the best epoch apart, labelled as picked on the test set
        assert cells[6:9] == [f"{run.final_top1:.2f}", f"{run.final_top5:.2f}", "1"]
        assert cells[11] == f"{run.best_top1:.2f}"
        assert cells[12:] == ["2 / 90", "**--width 8**", "cpu"]
    assert "Best-epoch Top1 (%), picked on the test set" in (results / "results.md").read_text()
    comparisons = (results / "comparisons.md").read_text()
    assert comparisons.count("| IN (1) | BN (1) |") == 2 and comparisons.count("n = 1, no interval") == 2
    pictures = {folder: list((results / folder).glob("*.png")) for folder in ("curves", "layers", "signal")}
    assert (len(pictures["curves"]), len(pictures["layers"]), len(pictures["signal"])) == (4, 4, 2)
    for path in [results / "top1_vs_batch_size.png", *sum(pictures.values(), [])]:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width >= 600 and image.height >= 300


def summary_row(**changes):
    row = {"data_name": "cifar10", "backbone_type": "resnet18", "norm_type": "in", "batch_size": 32,
           "optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.05, "lr_schedule": "cosine", "warmup_epochs": 1,
           "epochs": 90, "seed": 0, "subset": 0, "width": 64, "epochs_done": 90, "status": "finished",
           "params_m": 11.16, "flops": 556657152, "best_top1": 91.5, "best_top5": 99.7, "final_top1": 91.2,
           "final_top5": 99.6, "world_size": 1, "device": "NVIDIA H100 80GB HBM3"}
    return {**row, **changes}


def test_report_leaves_smoke_runs_out_of_the_table_and_says_how_many(tmp_path):
    pd.DataFrame([summary_row(), summary_row(batch_size=64, subset=512), summary_row(batch_size=128, epochs=2),
                  summary_row(norm_type="bn", width=8)]).to_csv(tmp_path / "summary.csv", index=False)
    report.main(["--results_dir", str(tmp_path)])
    text = (tmp_path / "results.md").read_text()
    assert [(r[2], r[3]) for r in table_rows(text)] == [("IN", "32")]
    assert "Left out: 3 run(s)" in text and "--all" in text
    report.main(["--results_dir", str(tmp_path), "--all"])
    rows = table_rows((tmp_path / "results.md").read_text())
    assert len(rows) == 4  # and the table says which are smoke runs
    assert sum("**--subset 512**" in r[13] for r in rows) == 1 and sum("**--width 8**" in r[13] for r in rows) == 1


def test_report_puts_the_originals_numbers_beside_ours(tmp_path):
    pd.DataFrame([summary_row(),
                  summary_row(norm_type="bn", batch_size=1, epochs_done=3, status="diverged", params_m=11.17,
                              flops=557889024, best_top1=None, best_top5=None, final_top1=None, final_top5=None,
                              device="cpu")]).to_csv(tmp_path / "summary.csv", index=False)
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{report.README_MARKERS[0]}\nold\n{report.README_MARKERS[1]}\ntail\n")
    report.main(["--results_dir", str(tmp_path), "--readme", str(readme)])
    text = (tmp_path / "results.md").read_text()
    ours = r"\| ResNet18 \| IN \| 32 \| 11\.16 \| 556\.66M \| 91\.20 \| 99\.60 \| 1 \| "  # the final epoch's
    assert re.search(ours + r"90\.11 \| 99\.66 \| 91\.50 \| 90 / 90 \|", text)  # the original's, the best epoch
    assert re.search(r"\| ResNet18 \| BN \| 1 \| .* \| diverged \| diverged \| 0 \(1 diverged left out\) \| "
                     r"10\.00 \| 50\.00 \| - \|", text)
    assert text in readme.read_text() and "old" not in readme.read_text() and readme.read_text().endswith("tail\n")


def test_architecture_png_is_drawn_by_report_py(tmp_path):
    report.main(["--architecture", str(tmp_path / "architecture.png")])
    with Image.open(tmp_path / "architecture.png") as drawn, Image.open(ROOT / "architecture.png") as committed:
        assert drawn.format == "PNG" and drawn.width >= 1200 and drawn.height >= 600
        assert drawn.size == committed.size  # the committed figure is this code's output
