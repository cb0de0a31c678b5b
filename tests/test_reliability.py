"""DDP under torchrun, checkpoints and resume, divergence, signals, determinism and not clobbering results."""
import os
import shutil
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from conftest import ROOT, run_cls, run_cls_here, write_cifar


def statistics(results):
    (path,) = results.glob("*_statistics.csv")
    return pd.read_csv(path)


def summary_row(results):
    summary = pd.read_csv(results / "summary.csv")
    assert len(summary) == 1
    return summary.iloc[0]


def assert_same_but_seconds(a: pd.DataFrame, b: pd.DataFrame):
    pd.testing.assert_frame_equal(a.drop(columns="seconds"), b.drop(columns="seconds"), check_exact=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_cifar(tmp_path_factory.mktemp("cifar") / "data", "cifar10", n_train=8, n_test=10)  # 40 train


@pytest.mark.parametrize("norm", ["wn", "in"])
def test_torchrun_two_processes_match_one_process_with_the_same_global_batch(tmp_path, data, norm):
    # lr 1e-4: Adam turns rounding noise in near-zero gradients into lr-sized steps; a smaller lr keeps that
    # chaos below the tolerance, while ranks that did not average their gradients would still differ by far more.
    common = ["--data_path", str(data), "--norm_type", norm, "--epochs", "2", "--lr", "1e-4", "--device", "cpu",
              "--workers", "0"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(ROOT / "cls.py"), *common, "--batch_size", "4", "--results_dir", str(tmp_path / "ddp")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = run_cls(*common, "--batch_size", "8", "--results_dir", str(tmp_path / "single"))
    assert single.returncode == 0, single.stderr

    two, one = statistics(tmp_path / "ddp"), statistics(tmp_path / "single")
    assert len(list((tmp_path / "ddp").glob("*_statistics.csv"))) == 1 and len(two) == 2
    row = summary_row(tmp_path / "ddp")
    assert (row.status, row.world_size, row.batch_size) == ("finished", 2, 4)
    for col in ("train_loss", "test_loss"):  # the gradients really are averaged over the two ranks
        assert two[col].tolist() == pytest.approx(one[col].tolist(), rel=1e-4)
    for col in ("test_top1", "test_top5"):  # train_top1 is left out: a near-tie on random data may flip
        assert two[col].tolist() == one[col].tolist()


def start_cls(*args):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "cls.py"), "--device", "cpu", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_for_epochs(results, n, proc, timeout=300):
    """Block until summary.csv, the last file an epoch writes, counts n finished epochs."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        if (results / "summary.csv").exists() and pd.read_csv(results / "summary.csv").epochs_done.max() >= n:
            return
        time.sleep(0.05)
    raise TimeoutError


RUN = ["--epochs", "3", "--batch_size", "4", "--seed", "3"]  # 10 steps an epoch on the 40 images


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data):
    results = tmp_path_factory.mktemp("uninterrupted")
    r = run_cls("--data_path", str(data), *RUN, "--results_dir", str(results))
    assert r.returncode == 0, r.stderr
    return results


def test_seeded_cpu_runs_are_identical_apart_from_seconds(tmp_path, data, uninterrupted):
    r = run_cls("--data_path", str(data), *RUN, "--results_dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert_same_but_seconds(statistics(tmp_path), statistics(uninterrupted))


def test_sigkill_in_epoch_2_then_resume_gives_the_uninterrupted_csv(tmp_path, data, uninterrupted):
    args = ["--data_path", str(data), *RUN, "--results_dir", str(tmp_path)]
    proc = start_cls(*args)
    wait_for_epochs(tmp_path, 1, proc)
    proc.kill()
    proc.communicate()
    assert len(statistics(tmp_path)) < 3
    assert summary_row(tmp_path).status == "incomplete"
    changed = run_cls(*args, "--resume", "--lr", "0.5")  # a resume must not mix two recipes in one CSV
    assert changed.returncode == 1 and "--lr" in changed.stderr and len(changed.stderr.strip().splitlines()) == 1
    r = run_cls(*args, "--resume")
    assert r.returncode == 0, r.stderr
    assert_same_but_seconds(statistics(tmp_path), statistics(uninterrupted))
    assert summary_row(tmp_path).status == "finished"


def test_sigterm_mid_epoch_leaves_a_loadable_checkpoint_and_a_consistent_csv(tmp_path, data, uninterrupted):
    args = ["--data_path", str(data), *RUN, "--results_dir", str(tmp_path)]
    proc = start_cls(*args)
    wait_for_epochs(tmp_path, 1, proc)
    time.sleep(1.0)  # into epoch 2's steps
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    lines = stderr.strip().splitlines()
    assert "--resume" in lines[-1] and "SIGTERM" in lines[-1] and "Traceback" not in stderr

    (checkpoint_path,) = tmp_path.glob("*_checkpoint.pth")
    checkpoint = torch.load(checkpoint_path, weights_only=False)
    stats = statistics(tmp_path)
    assert [row["epoch"] for row in checkpoint["history"]] == stats.epoch.tolist()
    assert checkpoint["progress"]["epoch"] == len(stats) + 1
    assert summary_row(tmp_path).status == "incomplete"
    assert not list(tmp_path.glob("*_model.pth"))

    r = run_cls(*args, "--resume")
    assert r.returncode == 0, r.stderr
    assert_same_but_seconds(statistics(tmp_path), statistics(uninterrupted))


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
    shutil.copytree(uninterrupted, tmp_path, dirs_exist_ok=True)
    args = ["--data_path", str(data), *RUN, "--results_dir", str(tmp_path)]
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    status, _, err = run_cls_here(capsys, *args)
    assert status == 1 and "--resume" in err and len(err.strip().splitlines()) == 1
    status, out, _ = run_cls_here(capsys, *args, "--resume")
    assert status == 0 and "already finished" in out
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
