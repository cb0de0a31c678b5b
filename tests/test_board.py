"""TensorBoard: the events hold what the run's CSVs hold, at the right steps, and a run that is stopped, or
killed before its checkpoint, and resumed draws each step once."""
import os
import signal

import numpy as np
import pandas as pd
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.summary.writer import event_file_writer

from conftest import RUN, record_of, run_cls_here
from utils.record import RunRecord

STEPS = 10  # RUN's steps per epoch: 40 images at batch 4


def events(record, purge=True) -> EventAccumulator:
    """Every point of the run's events, read as TensorBoard reads them: with purge, the points a restart
    (SummaryWriter's purge_step) hides are left out; without, the files' points as they are."""
    board = EventAccumulator(str(record.dir), size_guidance={"scalars": 0, "histograms": 0},
                             purge_orphaned_data=purge)
    return board.Reload()


def curve(board, tag) -> list:
    return [(e.step, e.value) for e in board.Scalars(tag)]


@pytest.fixture(autouse=True)
def files_sort_as_written(monkeypatch):
    """TensorBoard reads a run's event files in the order of their names: the second, then the process id,
    then a counter of the process's writers, whose 10 sorts before its 9. Separate processes never share
    the first two; the runs of a test do, so their counter starts from 0, as a new process's does."""
    monkeypatch.setattr(event_file_writer, "_global_uid", event_file_writer.AtomicCounter(0))


def test_the_events_hold_the_runs_statistics(tmp_path, data, capsys):
    flags = ["--data_path", str(data), "--epochs", "2", "--batch_size", "8", "--norm_type", "wn"]  # 5 steps an epoch
    status, out, err = run_cls_here(capsys, *flags, "--results_dir", str(tmp_path))
    assert status == 0, err
    record = record_of(tmp_path, *flags)
    assert f"tensorboard --logdir {tmp_path}" in out
    board = events(record)
    stats = pd.read_csv(record.statistics)
    for metric in ("top1", "top5", "loss"):  # float32 in the events
        assert curve(board, f"test/{metric}") == [(5, np.float32(stats[f"test_{metric}"][0])),
                                                  (10, np.float32(stats[f"test_{metric}"][1]))]
    # every step synced (an epoch of 5 steps syncs after each), and each point is the mean since the previous one
    loss, top1, lr = (curve(board, f"train/{m}") for m in ("loss", "top1", "lr"))
    assert [step for step, _ in loss] == [step for step, _ in top1] == [step for step, _ in lr] == list(range(1, 11))
    for epoch in (1, 2):
        part = slice(5 * (epoch - 1), 5 * epoch)
        assert np.mean([v for _, v in loss[part]]) == pytest.approx(stats.train_loss[epoch - 1], rel=1e-6)
        assert np.mean([v for _, v in top1[part]]) == pytest.approx(stats.train_top1[epoch - 1], rel=1e-6)
    assert lr[4][1] == np.float32(stats.lr[1])  # the lr after epoch 1's 5 steps: epoch 2's first
    layers = pd.read_csv(record.layers_csv)
    for row in layers.itertuples():
        for stat in ("weight_norm", "v_norm", "g_mean", "g_min", "grad_norm", "rel_change", "act_mean", "act_std"):
            value = getattr(row, stat)
            tag = f"{stat}/{row.layer}"
            if np.isnan(value):
                assert tag not in board.Tags()["scalars"] or row.epoch * 5 not in dict(curve(board, tag))
            else:
                assert dict(curve(board, tag))[row.epoch * 5] == np.float32(value), tag
    wn = layers[(layers.kind != "block") & layers.g_mean.notna()]
    assert sorted(f"g/{layer}" for layer in wn.layer.unique()) == sorted(board.Tags()["histograms"])
    for row in wn.itertuples():  # g over a layer's output channels
        (histogram,) = [h.histogram_value for h in board.Histograms(f"g/{row.layer}") if h.step == row.epoch * 5]
        assert histogram.min == pytest.approx(row.g_min, rel=1e-6)
        assert histogram.sum / histogram.num == pytest.approx(row.g_mean, rel=1e-5)
    (text,) = board.Tensors("recipe/text_summary")
    table = text.tensor_proto.string_val[0].decode()
    assert all(f"| {flag} | {value} |" in table for flag, value in {**record.recipe, "seed": 0}.items())


def test_no_tensorboard_writes_no_events(tmp_path, data, capsys):
    flags = ["--data_path", str(data), "--epochs", "1", "--batch_size", "40", "--no-tensorboard"]
    status, out, err = run_cls_here(capsys, *flags, "--results_dir", str(tmp_path))
    assert status == 0, err
    assert record_of(tmp_path, *flags).statistics.exists() and not list(tmp_path.rglob("events.out.tfevents.*"))
    assert "tensorboard --logdir" not in out


def stop_then_resume(tmp_path, data, capsys, monkeypatch, end_epoch_then) -> RunRecord:
    """RUN in this process, with RunRecord.end_epoch replaced by end_epoch_then(the original, record, *args)
    until the run exits; then RUN resumed to its end. Returns the run's record."""
    flags = ["--data_path", str(data), *RUN, "--results_dir", str(tmp_path)]
    end_epoch = RunRecord.end_epoch
    with monkeypatch.context() as m:
        m.setattr(RunRecord, "end_epoch", lambda record, *args: end_epoch_then(end_epoch, record, *args))
        status, _, err = run_cls_here(capsys, *flags)
    assert status == 128 + signal.SIGTERM, err
    status, _, err = run_cls_here(capsys, *flags, "--resume")
    assert status == 0, err
    return record_of(tmp_path, *flags)


def test_a_stopped_and_resumed_run_draws_each_step_once(tmp_path, data, capsys, monkeypatch, uninterrupted):
    def then_terminate(end_epoch, record, *args):
        end_epoch(record, *args)
        os.kill(os.getpid(), signal.SIGTERM)  # caught by the run, which stops at its next step

    record = stop_then_resume(tmp_path, data, capsys, monkeypatch, then_terminate)
    board = events(record, purge=False)  # the files themselves: nothing hidden
    assert len(list(record.dir.glob("events.out.tfevents.*"))) == 2  # one file per process
    steps = [step for step, _ in curve(board, "train/loss")]
    assert steps == sorted(set(steps)) == list(range(1, 4 * STEPS + 1))
    assert [step for step, _ in curve(board, "test/top1")] == [STEPS, 2 * STEPS, 3 * STEPS, 4 * STEPS]
    # the same points as the run that was never stopped, to the last digit: the sums since the last point
    # carried over the stop
    reference = events(record_of(uninterrupted.results, "--data_path", str(data), *RUN))
    for tag in ("train/loss", "train/top1", "train/lr", "test/top1"):
        assert curve(board, tag) == curve(reference, tag), tag


def test_points_written_after_the_last_checkpoint_are_hidden_on_resume(tmp_path, data, capsys, monkeypatch,
                                                                       uninterrupted):
    def killed_in_epoch_2(end_epoch, record, row, *args):
        """Epoch 2's steps are in the events, but its checkpoint is never written, as when a job is killed."""
        if row.epoch == 2:
            raise SystemExit(128 + signal.SIGTERM)
        end_epoch(record, row, *args)

    record = stop_then_resume(tmp_path, data, capsys, monkeypatch, killed_in_epoch_2)
    written = [step for step, _ in curve(events(record, purge=False), "train/loss")]
    assert sorted(written) == sorted([*range(1, 4 * STEPS + 1), *range(STEPS + 1, 2 * STEPS + 1)])  # 11-20 twice
    board = events(record)
    reference = events(record_of(uninterrupted.results, "--data_path", str(data), *RUN))
    for tag in ("train/loss", "train/top1", "train/lr", "test/top1"):
        assert curve(board, tag) == curve(reference, tag), tag
