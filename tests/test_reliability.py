"""DDP under torchrun, checkpoints and resume, divergence, signals, determinism and not clobbering results."""
import json
import shutil
import signal
import subprocess
import sys

import pandas as pd
import pytest
import torch

from conftest import ENV, NARROW, ROOT, RUN, files_of, record_of, run_cls_here, start_cls
from utils import runtime
from waiting import wait_until


def statistics(record):
    return pd.read_csv(record.statistics)


def layers(record):
    return pd.read_csv(record.layers_csv)


def head(record):
    return json.loads(record.args.read_text())


def assert_same_but_seconds(a: pd.DataFrame, b: pd.DataFrame):
    pd.testing.assert_frame_equal(a.drop(columns="seconds"), b.drop(columns="seconds"), check_exact=True)


COMMON = ["--epochs", "2", "--lr", "1e-4", "--init_images", "40"]


@pytest.fixture(scope="module")
def torchrun_sweep(tmp_path_factory, data):
    """wn, in and wn_mbn with --sync_bn, each on two CPU processes at batch 4, a global batch of 8: one torchrun
    of sweep.py, which runs the configurations in one process group. --sync_bn does nothing for wn and in."""
    results = tmp_path_factory.mktemp("ddp")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(ROOT / "sweep.py"), *NARROW, "--data_path", str(data), "--norm_type", "wn", "in", "wn_mbn",
                        "--sync_bn", "--batch_size", "4", *COMMON, "--results_dir", str(results)],
                       capture_output=True, text=True, env={**ENV, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return results


@pytest.mark.parametrize("norm", ["wn", "in", "wn_mbn"])
def test_torchrun_two_processes_match_one_process_with_the_same_global_batch(tmp_path, data, torchrun_sweep,
                                                                               norm, capsys):
    # lr 1e-4: Adam turns rounding noise in near-zero gradients into lr-sized steps; a smaller lr keeps that
    # chaos below the tolerance, while ranks that did not average their gradients would still differ by far more.
    # wn_mbn's mean-only BN matches only with --sync_bn: each rank's mean over its 4 images is not the 8's.
    flags = ["--data_path", str(data), "--norm_type", norm, *COMMON]
    status, _, err = run_cls_here(capsys, *flags, "--batch_size", "8", "--results_dir", str(tmp_path))
    assert status == 0, err
    one = record_of(tmp_path, *flags, "--batch_size", "8")
    two = record_of(torchrun_sweep, *flags, "--batch_size", "4", "--sync_bn", world=2)
    assert len(statistics(two)) == 2
    assert (head(two)["status"], two.recipe.world_size, two.recipe.sync_bn) == ("finished", 2, norm == "wn_mbn")
    for col in ("train_loss", "test_loss"):  # the gradients really are averaged over the two ranks
        assert statistics(two)[col].tolist() == pytest.approx(statistics(one)[col].tolist(), rel=1e-4)
    for col in ("test_top1", "test_top5"):  # train_top1 is left out: a near-tie on random data may flip
        assert statistics(two)[col].tolist() == statistics(one)[col].tolist()
    assert len(layers(two)) == len(layers(one)) > 0  # rank 0's, once


def wait_for_epochs(record, n, proc):
    """Until the run's statistics.csv counts n finished epochs."""
    wait_until(lambda: record.statistics.exists() and len(statistics(record)) >= n, proc, what=f"epoch {n}")


def test_seeded_cpu_runs_are_identical_apart_from_seconds(tmp_path, data, uninterrupted, capsys):
    flags = ["--data_path", str(data), *RUN]
    status, _, err = run_cls_here(capsys, *flags, "--results_dir", str(tmp_path))
    assert status == 0, err
    this, that = record_of(tmp_path, *flags), record_of(uninterrupted.results, *flags)
    assert_same_but_seconds(statistics(this), statistics(that))
    pd.testing.assert_frame_equal(layers(this), layers(that), check_exact=True)


def test_sigkill_in_epoch_2_then_resume_gives_the_uninterrupted_csvs(tmp_path, data, uninterrupted, capsys):
    args = ["--data_path", str(data), *RUN, "--results_dir", str(tmp_path)]
    record, theirs = record_of(tmp_path, *args), record_of(uninterrupted.results, *args)
    proc = start_cls(*args)
    wait_for_epochs(record, 1, proc)
    proc.kill()
    proc.communicate()
    assert len(statistics(record)) < 4 and record.status() == "incomplete"
    killed = files_of(tmp_path, locks=False)
    # Another lr is another run, with files of its own: no two recipes in one CSV.
    status, _, err = run_cls_here(capsys, *args, "--resume", "--lr", "0.5", "--epochs", "1")
    assert status == 0, err
    other = record_of(tmp_path, *args, "--lr", "0.5", "--epochs", "1")
    assert other.dir.parent != record.dir.parent and other.status() == "finished"
    assert {k: v for k, v in files_of(tmp_path, locks=False).items() if k in killed} == killed
    shutil.rmtree(other.dir.parent)
    status, _, err = run_cls_here(capsys, *args, "--resume")  # the warmup and cosine schedule, stepped per step
    assert status == 0, err
    assert_same_but_seconds(statistics(record), statistics(theirs))
    pd.testing.assert_frame_equal(layers(record), layers(theirs), check_exact=True)
    assert record.status() == "finished" and head(record)["epochs_done"] == 4


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR2])  # USR2: SLURM's warning before a time limit
def test_a_stop_signal_mid_epoch_leaves_a_loadable_checkpoint_and_a_consistent_csv(tmp_path, data, uninterrupted,
                                                                                    capsys, signum):
    args = ["--data_path", str(data), *RUN, "--results_dir", str(tmp_path)]
    record, theirs = record_of(tmp_path, *args), record_of(uninterrupted.results, *args)
    proc = start_cls(*args)
    wait_for_epochs(record, 1, proc)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum
    lines = stderr.strip().splitlines()
    assert "--resume" in lines[-1] and signal.Signals(signum).name in lines[-1] and "Traceback" not in stderr

    checkpoint = torch.load(record.checkpoint, weights_only=False)
    stats = statistics(record)
    assert [row["epoch"] for row in checkpoint["history"]] == stats.epoch.tolist()
    assert checkpoint["state"]["progress"]["epoch"] == len(stats) + 1
    assert record.status() == "incomplete" and not record.weights.exists()

    status, _, err = run_cls_here(capsys, *args, "--resume")
    assert status == 0, err
    assert_same_but_seconds(statistics(record), statistics(theirs))
    pd.testing.assert_frame_equal(layers(record), layers(theirs), check_exact=True)


def test_a_diverging_run_stops_and_is_marked_diverged(tmp_path, data, capsys):
    args = ["--data_path", str(data), "--epochs", "3", "--batch_size", "4", "--lr", "1e30",
            "--results_dir", str(tmp_path)]
    status, _, err = run_cls_here(capsys, *args)
    assert status == 1
    assert "diverged" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    record = record_of(tmp_path, *args)
    assert record.status() == "diverged" and head(record)["epochs_done"] == len(statistics(record)) < 3
    status, out, _ = run_cls_here(capsys, *args, "--resume")
    assert status == 0 and "already diverged" in out


def test_rerunning_a_finished_configuration_does_not_clobber_it(tmp_path, data, uninterrupted, capsys):
    shutil.copytree(uninterrupted.results, tmp_path, dirs_exist_ok=True)
    args = ["--data_path", str(data), *RUN, "--results_dir", str(tmp_path)]
    before = files_of(tmp_path)  # TensorBoard's events too
    assert not record_of(tmp_path, *args).checkpoint.exists()  # dropped when it finished
    status, _, err = run_cls_here(capsys, *args)
    assert status == 1 and "--resume" in err and len(err.strip().splitlines()) == 1
    status, out, _ = run_cls_here(capsys, *args, "--resume")
    assert status == 0 and "already finished" in out
    assert files_of(tmp_path) == before
    folder = record_of(tmp_path, *args).dir.parent
    for flag, value in (("--epochs", "5"), ("--lr", "0.01"), ("--optimizer", "adam"), ("--width", "16")):
        assert record_of(tmp_path, *args, flag, value).dir.parent != folder  # another run, with its own files


@pytest.mark.parametrize("env,command", [
    ({}, ["python"]),
    ({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}, ["torchrun", "--nproc_per_node", "2"]),
    ({"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4"}, ["torchrun", "--nnodes", "2", "--nproc_per_node", "4"]),
])
def test_the_resume_hint_starts_the_run_as_it_was_started(monkeypatch, env, command):
    for key in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert runtime.launcher() == command
