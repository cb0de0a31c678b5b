"""sweep.py runs a grid, one after another or side by side, checked whole before anything runs, and skips what is
finished; report.py turns the runs' files into the table and the plots."""
import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from PIL import Image

import report
from conftest import ENV, NARROW, ROOT, fake_run, record_of, write_cifar
from recipe import Context, Recipe
from sweep import parse as parse_sweep
from utils.metrics import human
from utils.record import recipe_folder
from waiting import wait_until


def sweep(*args):
    return subprocess.Popen([sys.executable, str(ROOT / "sweep.py"), *NARROW, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)


def records(results, data, grid, *common):
    """{point: record} of every point of a grid {flag: [values]} of cls.py flags; common: the rest."""
    (flag_a, values_a), (flag_b, values_b) = grid.items()
    return {(a, b): record_of(results, "--data_path", str(data), flag_a, a, flag_b, b, *common)
            for a in values_a for b in values_b}


def epochs_done(record) -> int:
    return len(pd.read_csv(record.statistics)) if record.statistics.exists() else 0


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """A 2x2 sweep, one configuration after another, killed after its second configuration and started again."""
    root = tmp_path_factory.mktemp("sweep")
    data = write_cifar(root / "data", "cifar10", n_train=4, n_test=6)  # 20 train images
    results = root / "results"
    grid = {"--norm_type": ["bn", "in"], "--batch_size": ["5", "10"]}
    runs = records(results, data, grid, "--epochs", "2")
    args = ["--norm_type", "bn", "in", "--batch_size", "5", "10", "--epochs", "2", "--data_path", str(data),
            "--results_dir", str(results)]
    first = sweep(*args)
    wait_until(lambda: sum(r.status() == "finished" for r in runs.values()) >= 2, first, what="two finished runs")
    first.send_signal(signal.SIGKILL)
    first.communicate()
    finished = {r.name: r.statistics.read_bytes() for r in runs.values() if r.status() == "finished"}
    second = sweep(*args)
    out, err = second.communicate(timeout=300)
    assert second.returncode == 0, err[-2000:]
    return results, runs, finished, out


def test_sweep_runs_the_grid_and_skips_finished_configurations_after_an_interruption(swept):
    results, runs, finished, out = swept
    assert all(r.status() == "finished" and epochs_done(r) == 2 for r in runs.values())
    assert len(finished) >= 2 and out.count("already finished") >= 2
    for record in runs.values():  # skipped, not run again
        if record.name in finished:
            assert record.statistics.read_bytes() == finished[record.name]
    summary = pd.read_csv(results / "summary.csv")  # the index, derived at the sweep's end
    assert sorted(summary.name) == sorted(r.name for r in runs.values()) and (summary.status == "finished").all()


@pytest.fixture(scope="module")
def parallel(tmp_path_factory, data):
    """bn and in side by side (--jobs 2): stopped by Ctrl-C once both have finished an epoch, started again to
    finish, and started a third time. What each step left behind, for the tests below."""
    results = tmp_path_factory.mktemp("parallel")
    runs = records(results, data, {"--norm_type": ["bn", "in"], "--batch_size": ["8"]}, "--epochs", "8")
    args = ["--norm_type", "bn", "in", "--batch_size", "8", "--jobs", "2", "--epochs", "8", "--data_path",
            str(data), "--results_dir", str(results)]
    first = sweep(*args)
    wait_until(lambda: all(epochs_done(r) for r in runs.values()), first, what="both runs finishing an epoch")
    first.send_signal(signal.SIGINT)
    out, err = first.communicate(timeout=120)
    stopped = SimpleNamespace(code=first.returncode, out=out, err=err, status=[r.status() for r in runs.values()],
                              checkpoints=[torch.load(r.checkpoint, weights_only=False) for r in runs.values()])
    second = sweep(*args)
    out, err = second.communicate(timeout=300)
    csvs = lambda: {str(p.relative_to(results)): p.read_bytes() for p in results.rglob("*.csv")}  # noqa: E731
    finished = SimpleNamespace(code=second.returncode, out=out, err=err, status=[r.status() for r in runs.values()],
                               epochs=[epochs_done(r) for r in runs.values()], files=csvs())
    third = sweep(*args)
    out, err = third.communicate(timeout=300)
    again = SimpleNamespace(code=third.returncode, out=out, err=err, files=csvs())
    logs = [r.log.read_text() for r in runs.values()]
    return SimpleNamespace(stopped=stopped, finished=finished, again=again, logs=logs)


def test_stopping_a_parallel_sweep_stops_both_runs_with_checkpoints_to_resume(parallel):
    stopped = parallel.stopped
    assert stopped.code == 128 + signal.SIGINT and "Traceback" not in stopped.err
    assert "stopped by SIGINT" in stopped.err.strip().splitlines()[-1]
    assert stopped.out.count(": stopped (exit status 130)") == 2  # the sweep waited for both
    assert all(1 < checkpoint["state"]["progress"]["epoch"] <= 8 for checkpoint in stopped.checkpoints)
    assert stopped.status == ["incomplete", "incomplete"]
    assert all("resuming" in log for log in parallel.logs)  # the second sweep went on from there


def test_two_jobs_write_two_finished_runs(parallel):
    finished = parallel.finished
    assert finished.code == 0 and "2 at a time" in finished.out, finished.err
    assert finished.out.count(": finished (exit status 0)") == 2
    assert finished.status == ["finished", "finished"] and finished.epochs == [8, 8]
    assert all(log.count("finished: results in") == 1 for log in parallel.logs)


def test_a_finished_parallel_sweep_is_skipped_when_run_again(parallel):
    again = parallel.again
    assert again.code == 0 and again.out.count("is already finished") == 2 and "started" not in again.out, again.err
    assert again.files == parallel.finished.files


def test_a_child_killed_by_a_signal_is_reported_as_killed(tmp_path, data):
    run = record_of(tmp_path, "--data_path", str(data), "--epochs", "50", "--batch_size", "8")
    proc = sweep("--norm_type", "bn", "in", "--jobs", "2", "--epochs", "50", "--batch_size", "8", "--data_path",
                 str(data), "--results_dir", str(tmp_path))
    wait_until(lambda: epochs_done(run) >= 1, proc, what="the bn run's first epoch")
    os.kill(int(run.lock.read_text()), signal.SIGKILL)  # as the OOM killer does
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1 and f"{run.name}: killed by SIGKILL" in out, out
    (line,) = err.strip().splitlines()
    assert "was killed by SIGKILL" in line and str(run.log) in line and "images/s" not in line


def test_the_grid_takes_several_values_of_every_defining_flag_with_its_type_and_choices(data, capsys):
    configs, _, _ = parse_sweep(["--seed", "0", "1", "--norm_type", "bn", "wn", "--lr", "1e-3", "0.001", "--no-bf16",
                              "--residual_scale", "0.5", "--data_path", str(data)])
    grid = [(c.args.seed, c.args.norm_type) for c in configs]
    assert sorted(grid) == [(0, "bn"), (0, "wn"), (1, "bn"), (1, "wn")]  # 1e-3 and 0.001 are one run
    assert all(c.args.lr == 0.001 and c.args.residual_scale == 0.5 and not c.args.bf16 for c in configs)
    assert capsys.readouterr().out.count("2 points of the grid") == 4


def test_equal_recipes_run_once_and_distinct_values_stay_distinct(data, capsys):
    configs, _, _ = parse_sweep(["--warmup_epochs", "0.5", "1", "5", "--epochs", "1", "--lr", "0.002", "0.0020000001",
                              "--data_path", str(data)])
    assert sorted(c.record.recipe.lr for c in configs) == [0.002, 0.0020000001]  # two runs, not one, not six
    assert len({c.record.dir for c in configs}) == 2
    out = capsys.readouterr().out
    assert out.count("3 points of the grid (--warmup_epochs 0.5 / 1.0 / 5.0) train one run") == 2


@pytest.mark.parametrize("bad,words", [
    (["--norm_type", "bn", "ws_gn", "--width", "1"], ["--width", "at least 2", "ws_gn"]),
    (["--batch_size", "8", "41"], ["--batch_size", "at most 40", "got 41"]),
    (["--norm_type", "bn", "wn", "--init_images", "8", "41"], ["--init_images", "at most 40"]),
])
def test_a_grid_with_one_bad_point_is_refused_whole_before_any_run(data, tmp_path, bad, words):
    proc = sweep(*bad, "--epochs", "1", "--data_path", str(data), "--results_dir", str(tmp_path))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert all(word in err for word in words), err
    assert not list(tmp_path.iterdir())  # nothing ran


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
    runs = records(tmp_path, data, {"--seed": ["0", "1"], "--norm_type": ["bn", "wn"]}, "--epochs", "1",
                   "--batch_size", "10")
    for (seed, norm), record in runs.items():
        head = json.loads(record.args.read_text())
        assert (head["seed"], head["recipe"]["norm_type"], head["status"]) == (int(seed), norm, "finished")
    assert len({r.dir.parent for r in runs.values()}) == 2  # a folder per recipe, a seed folder per seed


def test_the_same_run_asked_for_twice_runs_once(data, tmp_path):
    proc = sweep("--jobs", "2", "--norm_type", "bn", "bn", "--epochs", "1", "--batch_size", "10", "--data_path",
                 str(data), "--results_dir", str(tmp_path))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert out.count("started") == 1 and "2 points of the grid (the same values) train one run" in out
    assert len(list(tmp_path.glob("*/seed*/args.json"))) == 1


def claim(results, recipe, context, barrier, queue):
    barrier.wait()
    queue.put((recipe.bf16, str(recipe_folder(results, recipe, context, create=True))))


def test_processes_claiming_folders_at_once_get_one_folder_per_recipe(tmp_path):
    processes = multiprocessing.get_context("fork")
    cpu, cuda = Context("cpu", 1, 40), Context("cuda", 1, 40)
    same = record_of(tmp_path, "--lr", "0.002").recipe
    other = Recipe.resolve({**same, "bf16": True}, cuda)  # bf16 on CUDA: by its default, the same name
    assert same != other and same.name(cpu) == other.name(cuda)
    barrier, queue = processes.Barrier(6), processes.Queue()
    workers = [processes.Process(target=claim, args=(tmp_path, recipe, context, barrier, queue))
               for recipe, context in [(same, cpu)] * 3 + [(other, cuda)] * 3]
    for w in workers:
        w.start()
    folders = [queue.get(timeout=60) for _ in workers]
    for w in workers:
        w.join(timeout=60)
        assert w.exitcode == 0
    folder = dict(folders)
    assert len(set(folders)) == 2 and len(set(folder.values())) == 2  # each recipe one folder, its own
    name = same.name(cpu)  # whichever claimed it first; the other's name adds what differs from it
    assert sorted(folder.values()) in ([str(tmp_path / name), str(tmp_path / f"{name}_bf16")],
                                       [str(tmp_path / name), str(tmp_path / f"{name}_no_bf16")])
    for bf16, recipe in ((False, same), (True, other)):
        assert Recipe.from_json(json.loads((tmp_path / folder[bf16] / "recipe.json").read_text())) == recipe
    assert len(list(tmp_path.glob("*/recipe.json"))) == 2 and not list(tmp_path.rglob("*.tmp"))


# -----------------------------------------------------------------------------
# report.py

def table_rows(text):
    return [[c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines() if line.startswith("| CIFAR10")]


def test_report_table_equals_the_runs_files_and_the_plots_are_pngs(swept):
    results, runs, _, _ = swept
    report.main(["--results_dir", str(results), "--all"])
    rows = table_rows((results / "results.md").read_text())
    assert len(rows) == len(runs)
    for cells in rows:
        record = runs[{"BN": "bn", "IN": "in"}[cells[2]], cells[3]]
        stats, head = pd.read_csv(record.statistics), json.loads(record.args.read_text())
        assert cells[4] == f"{head['params'] / 1e6:.2f}" and cells[5] == human(head["flops"])
        # one seed: the final epoch's accuracy, no spread; the best epoch apart, labelled as picked on the test set,
        # the only split these runs have
        assert cells[6:9] == [f"{stats.test_top1.iloc[-1]:.2f}", f"{stats.test_top5.iloc[-1]:.2f}", "1"]
        assert cells[11] == f"{stats.test_top1.max():.2f}, test"
        assert cells[12:15] == ["2 / 90", "**--width 8**", "cpu"] and head["git_commit"].startswith(cells[15][:7])
    assert "Best-epoch Top1 (%), picked on |" in (results / "results.md").read_text()
    comparisons = (results / "comparisons.md").read_text()
    assert comparisons.count("| IN (1) | BN (1) |") == 2 and comparisons.count("n = 1, no interval") == 2
    pictures = {folder: list((results / folder).rglob("*.png")) for folder in ("curves", "layers", "signal")}
    assert (len(pictures["curves"]), len(pictures["layers"]), len(pictures["signal"])) == (4, 4, 2)
    assert sorted(str(p.relative_to(results / "layers")) for p in pictures["layers"]) == \
        sorted(f"{r.name}.png" for r in runs.values())
    for path in [results / "top1_vs_batch_size.png", *sum(pictures.values(), [])]:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width >= 600 and image.height >= 300


def test_report_leaves_smoke_runs_out_of_the_table_and_says_how_many(tmp_path):
    full = ["--norm_type", "in", "--epochs", "3"]
    fake_run(tmp_path, full, [80.0, 85.0, 91.2])
    fake_run(tmp_path, [*full, "--batch_size", "64", "--subset", "512"], [80.0, 85.0, 90.0])
    fake_run(tmp_path, [*full, "--batch_size", "128", "--epochs", "2"], [80.0, 85.0])
    fake_run(tmp_path, [*full, "--norm_type", "bn", "--width", "8"], [80.0, 85.0, 90.0])
    report.main(["--results_dir", str(tmp_path), "--min_epochs", "3"])
    text = (tmp_path / "results.md").read_text()
    assert [(r[2], r[3]) for r in table_rows(text)] == [("IN", "32")]
    assert "Left out: 3 run(s)" in text and "--all" in text
    report.main(["--results_dir", str(tmp_path), "--all"])
    rows = table_rows((tmp_path / "results.md").read_text())
    assert len(rows) == 4  # and the table says which are smoke runs
    assert sum("**--subset 512**" in r[13] for r in rows) == 1 and sum("**--width 8**" in r[13] for r in rows) == 1


def test_report_puts_the_originals_numbers_beside_ours(tmp_path):
    fake_run(tmp_path, ["--norm_type", "in", "--epochs", "3"], [80.0, 91.5, 91.2], [95.0, 99.7, 99.6], device="cuda",
             params=11_163_978, flops=556_657_152)
    fake_run(tmp_path, ["--batch_size", "1", "--epochs", "3"], [10.0, 10.0, 10.0], status="diverged")
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{report.README_MARKERS[0]}\nold\n{report.README_MARKERS[1]}\ntail\n")
    report.main(["--results_dir", str(tmp_path), "--readme", str(readme), "--min_epochs", "3"])
    text = (tmp_path / "results.md").read_text()
    ours = r"\| ResNet18 \| IN \| 32 \| 11\.16 \| 556\.66M \| 91\.20 \| 99\.60 \| 1 \| "  # the final epoch's
    assert re.search(ours + r"90\.11 \| 99\.66 \| 91\.50, test \| 3 / 90 \| defaults \| NVIDIA H100 80GB HBM3 \|", text)
    assert re.search(r"\| ResNet18 \| BN \| 1 \| .* \| diverged \| diverged \| 0 \(1 diverged left out\) \| "
                     r"10\.00 \| 50\.00 \| - \|", text)
    assert text in readme.read_text() and "old" not in readme.read_text() and readme.read_text().endswith("tail\n")

