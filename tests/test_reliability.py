"""DDP under torchrun, checkpoints and resume, divergence, signals, determinism and not clobbering results."""
import shutil
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

import cls
from conftest import ENV, NARROW, ROOT, RUN, run_cls_here, start_cls


def statistics(results):
    (path,) = results.glob("*_statistics.csv")
    return pd.read_csv(path)


def layers(results):
    (path,) = results.glob("*_layers.csv")
    return pd.read_csv(path)


def summary_row(results):
    summary = pd.read_csv(results / "summary.csv")
    assert len(summary) == 1
    return summary.iloc[0]


def assert_same_but_seconds(a: pd.DataFrame, b: pd.DataFrame):
    pd.testing.assert_frame_equal(a.drop(columns="seconds"), b.drop(columns="seconds"), check_exact=True)


COMMON = ["--epochs", "2", "--lr", "1e-4", "--init_images", "40"]


@pytest.fixture(scope="module")
def torchrun_sweep(tmp_path_factory, data):
    """wn and in, each on two CPU processes at batch 4, a global batch of 8: one torchrun of sweep.py, which
    runs both configurations in one process group."""
    results = tmp_path_factory.mktemp("ddp")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(ROOT / "sweep.py"), *NARROW, "--data_path", str(data), "--norm_type", "wn", "in",
                        "--batch_size", "4", *COMMON, "--results_dir", str(results)], capture_output=True, text=True,
                       env={**ENV, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return results


@pytest.mark.parametrize("norm", ["wn", "in"])
def test_torchrun_two_processes_match_one_process_with_the_same_global_batch(tmp_path, data, torchrun_sweep,
                                                                               norm, capsys):
    # lr 1e-4: Adam turns rounding noise in near-zero gradients into lr-sized steps; a smaller lr keeps that
    # chaos below the tolerance, while ranks that did not average their gradients would still differ by far more.
    status, _, err = run_cls_here(capsys, "--data_path", str(data), "--norm_type", norm, "--batch_size", "8",
                                  *COMMON, "--results_dir", str(tmp_path))
    assert status == 0, err
    name = cls.parse_args([*NARROW, "--norm_type", norm, "--batch_size", "4", *COMMON]).name
    two, one = pd.read_csv(torchrun_sweep / f"{name}_statistics.csv"), statistics(tmp_path)
    assert len(two) == 2
    row = pd.read_csv(torchrun_sweep / "summary.csv").set_index("norm_type").loc[norm]
    assert (row.status, row.world_size, row.batch_size) == ("finished", 2, 4)
    for col in ("train_loss", "test_loss"):  # the gradients really are averaged over the two ranks
        assert two[col].tolist() == pytest.approx(one[col].tolist(), rel=1e-4)
    for col in ("test_top1", "test_top5"):  # train_top1 is left out: a near-tie on random data may flip
        assert two[col].tolist() == one[col].tolist()
    assert len(pd.read_csv(torchrun_sweep / f"{name}_layers.csv")) == len(layers(tmp_path)) > 0  # rank 0's, once


def wait_for_epochs(results, n, proc, timeout=300):
    """Block until summary.csv, the last file an epoch writes, counts n finished epochs."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        if (results / "summary.csv").exists() and pd.read_csv(results / "summary.csv").epochs_done.max() >= n:
            return
        time.sleep(0.05)
    raise TimeoutError


def test_seeded_cpu_runs_are_identical_apart_from_seconds(tmp_path, data, uninterrupted, capsys):
    status, _, err = run_cls_here(capsys, "--data_path", str(data), *RUN, "--results_dir", str(tmp_path))
    assert status == 0, err
    assert_same_but_seconds(statistics(tmp_path), statistics(uninterrupted.results))
    pd.testing.assert_frame_equal(layers(tmp_path), layers(uninterrupted.results), check_exact=True)


def test_sigkill_in_epoch_2_then_resume_gives_the_uninterrupted_csvs(tmp_path, data, uninterrupted, capsys):
    args = ["--data_path", str(data), *RUN, "--results_dir", str(tmp_path)]
    proc = start_cls(*args)
    wait_for_epochs(tmp_path, 1, proc)
    proc.kill()
    proc.communicate()
    assert len(statistics(tmp_path)) < 4
    assert summary_row(tmp_path).status == "incomplete"
    killed = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    # Another lr is another run, with files of its own: no two recipes in one CSV.
    status, _, err = run_cls_here(capsys, *args, "--resume", "--lr", "0.5", "--epochs", "1")
    assert status == 0, err
    other = cls.parse_args([*NARROW, *args, "--lr", "0.5", "--epochs", "1"]).name
    assert other != cls.parse_args([*NARROW, *args]).name and (tmp_path / f"{other}_model.pth").exists()
    assert all((tmp_path / name).read_bytes() == content for name, content in killed.items() if name != "summary.csv")
    for path in tmp_path.glob(f"{other}_*"):
        path.unlink()
    status, _, err = run_cls_here(capsys, *args, "--resume")  # the warmup and cosine schedule, stepped per step
    assert status == 0, err
    assert_same_but_seconds(statistics(tmp_path), statistics(uninterrupted.results))
    pd.testing.assert_frame_equal(layers(tmp_path), layers(uninterrupted.results), check_exact=True)
    summary = pd.read_csv(tmp_path / "summary.csv").set_index("name")
    assert summary.status.to_dict() == {cls.parse_args([*NARROW, *args]).name: "finished", other: "finished"}


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR2])  # USR2: SLURM's warning before a time limit
def test_a_stop_signal_mid_epoch_leaves_a_loadable_checkpoint_and_a_consistent_csv(tmp_path, data, uninterrupted,
                                                                                    capsys, signum):
    args = ["--data_path", str(data), *RUN, "--results_dir", str(tmp_path)]
    proc = start_cls(*args)
    wait_for_epochs(tmp_path, 1, proc)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum
    lines = stderr.strip().splitlines()
    assert "--resume" in lines[-1] and signal.Signals(signum).name in lines[-1] and "Traceback" not in stderr

    (checkpoint_path,) = tmp_path.glob("*_checkpoint.pth")
    checkpoint = torch.load(checkpoint_path, weights_only=False)
    stats = statistics(tmp_path)
    assert [row["epoch"] for row in checkpoint["history"]] == stats.epoch.tolist()
    assert checkpoint["state"]["progress"]["epoch"] == len(stats) + 1
    assert summary_row(tmp_path).status == "incomplete"
    assert not list(tmp_path.glob("*_model.pth"))

    status, _, err = run_cls_here(capsys, *args, "--resume")
    assert status == 0, err
    assert_same_but_seconds(statistics(tmp_path), statistics(uninterrupted.results))
    pd.testing.assert_frame_equal(layers(tmp_path), layers(uninterrupted.results), check_exact=True)


def test_a_diverging_run_stops_and_is_marked_diverged(tmp_path, data, capsys):
    args = ["--data_path", str(data), "--epochs", "3", "--batch_size", "4", "--lr", "1e30",
            "--results_dir", str(tmp_path)]
    status, _, err = run_cls_here(capsys, *args)
    assert status == 1
    assert "diverged" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    row = summary_row(tmp_path)
    assert row.status == "diverged" and row.epochs_done == len(statistics(tmp_path)) < 3
    status, out, _ = run_cls_here(capsys, *args, "--resume")
    assert status == 0 and "already diverged" in out


def test_rerunning_a_finished_configuration_does_not_clobber_it(tmp_path, data, uninterrupted, capsys):
    shutil.copytree(uninterrupted.results, tmp_path, dirs_exist_ok=True)
    args = ["--data_path", str(data), *RUN, "--results_dir", str(tmp_path)]
    before = {str(p.relative_to(tmp_path)): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}  # events too
    assert not any(name.endswith("_checkpoint.pth") for name in before)  # dropped when it finished
    status, _, err = run_cls_here(capsys, *args)
    assert status == 1 and "--resume" in err and len(err.strip().splitlines()) == 1
    status, out, _ = run_cls_here(capsys, *args, "--resume")
    assert status == 0 and "already finished" in out
    assert {str(p.relative_to(tmp_path)): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    name = cls.parse_args([*NARROW, *args]).name
    for flag, value in (("--epochs", "5"), ("--lr", "0.01"), ("--optimizer", "adam"), ("--width", "16")):
        assert cls.parse_args([*NARROW, *args, flag, value]).name != name  # another run, with its own files
