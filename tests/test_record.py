"""The run record: runs named by their recipe, the run's own files as the truth, one process per run, checkpoints
that resume only their own run, nothing non-finite recorded as a result, and the provenance of every result."""
import json
import os
import shutil
import signal
import subprocess
import sys

import pandas as pd
import pytest
import torch

import cls
import report
from conftest import NARROW, ROOT, RUN, run_cls_here, start_cls, write_cifar
from model import build_model, data_dependent_init
from utils.runfiles import DONE, RunRecord, read_summary, run_name, write_summary_row


def name_of(*flags):
    return cls.parse_args([*NARROW, *flags]).name


def files_of(folder):
    """Every file's bytes but a lock's: a killed process leaves its lock file, which locks nothing."""
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and not p.name.endswith(".lock")}


@pytest.fixture
def finished(tmp_path, uninterrupted, data):
    """A copy of the uninterrupted run's folder, its cls.py flags, its name and its files' bytes."""
    results = tmp_path / "results"
    shutil.copytree(uninterrupted.results, results)
    args = ["--data_path", str(data), *RUN, "--results_dir", str(results)]
    return results, args, name_of(*args), files_of(results)


# -----------------------------------------------------------------------------
# names

def test_the_default_recipe_keeps_the_originals_name_and_others_spell_out_what_differs():
    assert cls.parse_args([]).name == "cifar10_resnet18_bn_32"
    assert cls.parse_args(["--norm_type", "wn", "--seed", "1"]).name == "cifar10_resnet18_wn_32_seed1"
    assert cls.parse_args(["--lr", "3e-3", "--no-bf16"]).name == "cifar10_resnet18_bn_32_lr0.003_no_bf16"
    # the device, the data's path and the like may change: they do not name the run
    assert cls.parse_args(["--device", "cpu", "--data_path", "x", "--workers", "2", "--resume"]).name == \
           "cifar10_resnet18_bn_32"


def test_many_differing_flags_give_a_short_deterministic_hash():
    pairs = [["--seed", "1"], ["--lr", "0.01"], ["--epochs", "3"], ["--width", "16"]]
    name = cls.parse_args(sum(pairs, [])).name
    assert name == cls.parse_args(sum(reversed(pairs), [])).name  # the order flags are given in does not matter
    assert name.startswith("cifar10_resnet18_bn_32_") and len(name) == len("cifar10_resnet18_bn_32_") + 8
    assert cls.parse_args([*sum(pairs, []), "--seed", "2"]).name != name


def test_every_defining_flag_changes_the_name():
    defaults = dict(cls.DEFAULTS)
    base = run_name(defaults, cls.DEFAULTS)
    for flag, value in defaults.items():
        changed = {**defaults, flag: (not value) if isinstance(value, bool) else f"{value}x"}
        assert run_name(changed, cls.DEFAULTS) != base, flag


# -----------------------------------------------------------------------------
# seeds side by side

def test_two_seeds_of_one_configuration_live_side_by_side_and_each_resumes(tmp_path, data, capsys):
    runs = {seed: ["--data_path", str(data), "--epochs", "1", "--batch_size", "8", "--seed", seed,
                   "--results_dir", str(tmp_path)] for seed in ("0", "1")}
    for flags in runs.values():
        status, _, err = run_cls_here(capsys, *flags)
        assert status == 0, err
    summary = pd.read_csv(tmp_path / "summary.csv").set_index("name")
    names = {seed: name_of(*flags) for seed, flags in runs.items()}
    assert sorted(summary.index) == sorted(names.values()) and (summary.status == "finished").all()
    assert summary.seed.to_dict() == {names["0"]: 0, names["1"]: 1}
    stats = {seed: pd.read_csv(tmp_path / f"{name}_statistics.csv") for seed, name in names.items()}
    assert stats["0"].train_loss.iloc[0] != stats["1"].train_loss.iloc[0]  # really two trainings
    before = files_of(tmp_path)
    for flags in runs.values():
        status, out, _ = run_cls_here(capsys, *flags, "--resume")
        assert status == 0 and "already finished" in out
    assert files_of(tmp_path) == before


# -----------------------------------------------------------------------------
# the run's files are the truth; summary.csv is an index

@pytest.mark.parametrize("edit", ["empty_field", "extra_row", "row_removed", "summary_removed", "summary_moved"])
def test_an_edited_or_removed_summary_never_retrains_a_finished_run(finished, capsys, edit):
    results, args, name, before = finished
    summary = results / "summary.csv"
    df = pd.read_csv(summary)
    if edit == "empty_field":  # pandas then reads every batch_size as a float, 4.0
        df.loc[0, "final_top5"] = None
        df.loc[len(df)] = {**df.iloc[0].to_dict(), "name": "other", "batch_size": None}
        df.to_csv(summary, index=False)
    elif edit == "extra_row":
        df.loc[len(df)] = {**df.iloc[0].to_dict(), "name": "elsewhere", "lr": 0.5}
        df.to_csv(summary, index=False)
    elif edit == "row_removed":
        df.iloc[:0].to_csv(summary, index=False)
    elif edit == "summary_removed":
        summary.unlink()
    else:
        summary.rename(results / "old-summary.csv")
    status, out, err = run_cls_here(capsys, *args, "--resume")
    assert status == 0 and "already finished" in out, err
    after = files_of(results)
    runs_files = lambda files: {k: v for k, v in files.items() if "summary" not in k}  # noqa: E731
    assert runs_files(after) == runs_files(before)
    restored = pd.read_csv(summary).set_index("name").loc[name]
    original = pd.read_csv(pd.io.common.StringIO(before["summary.csv"].decode())).set_index("name").loc[name]
    assert restored.drop("final_top5").equals(original.drop("final_top5"))
    assert restored.final_top5 == original.final_top5  # restored from the statistics, not the edited cell
    if edit in ("empty_field", "extra_row"):
        assert len(pd.read_csv(summary)) == 2  # the other row is left as it was


def test_a_finished_run_whose_files_are_gone_says_so(finished, capsys):
    results, args, name, _ = finished
    (results / f"{name}_model.pth").unlink()
    status, out, err = run_cls_here(capsys, *args, "--resume")
    assert status == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert f"{name}_model.pth" in err and "missing" in err and "move" in err and "already" not in out


def test_a_users_extra_column_survives_every_write(finished, capsys):
    results, args, name, _ = finished
    df = pd.read_csv(results / "summary.csv")
    df.insert(3, "notes", ["looks fine"])
    df.to_csv(results / "summary.csv", index=False)
    status, _, err = run_cls_here(capsys, *args, "--resume")  # rewrites the row
    assert status == 0, err
    status, _, err = run_cls_here(capsys, *args, "--epochs", "1", "--seed", "5")  # adds another row
    assert status == 0, err
    after = pd.read_csv(results / "summary.csv").set_index("name")
    assert list(after.columns)[2] == "notes" and after.notes[name] == "looks fine" and pd.isna(after.notes.iloc[1])


def test_rows_are_matched_by_name_and_never_retyped(tmp_path):
    summary = tmp_path / "summary.csv"
    write_summary_row(summary, {"name": "a", "data_name": "cifar10", "backbone_type": "resnet18", "norm_type": "bn",
                                "batch_size": 8, "lr": 0.001, "status": "incomplete"})
    write_summary_row(summary, {"name": "b", "data_name": "cifar10", "backbone_type": "resnet18", "norm_type": "bn",
                                "batch_size": None, "lr": 0.001, "status": "finished"})
    write_summary_row(summary, {"name": "a", "data_name": "cifar10", "backbone_type": "resnet18", "norm_type": "bn",
                                "batch_size": 8, "lr": 0.001, "status": "finished"})
    text = summary.read_text().splitlines()
    assert text[1] == "a,cifar10,resnet18,bn,8,0.001,finished" and text[2] == "b,cifar10,resnet18,bn,,0.001,finished"


def test_an_old_summary_without_names_still_reads(tmp_path):
    old_columns = ["data_name", "backbone_type", "norm_type", "batch_size", "optimizer", "lr", "epochs", "seed",
                   "epochs_done", "status", "params_m", "flops", "best_top1", "final_top1", "world_size", "device"]
    row = ["cifar10", "resnet18", "wn", 32, "adamw", 0.001, 8, 0, 8, "finished", 0.7, 35e6, 51.2, 50.9, 1, "cpu"]
    pd.DataFrame([row], columns=old_columns).to_csv(tmp_path / "summary.csv", index=False)
    assert read_summary(tmp_path / "summary.csv").name.tolist() == ["cifar10_resnet18_wn_32"]
    write_summary_row(tmp_path / "summary.csv", {"name": "cifar10_resnet18_bn_32", "data_name": "cifar10",
                                                 "backbone_type": "resnet18", "norm_type": "bn", "batch_size": 32,
                                                 "status": "finished"})
    both = pd.read_csv(tmp_path / "summary.csv")
    assert both.name.tolist() == ["cifar10_resnet18_wn_32", "cifar10_resnet18_bn_32"] and both.best_top1[0] == 51.2


# -----------------------------------------------------------------------------
# one process per run

def test_two_commands_for_one_run_one_trains_and_the_other_refuses(tmp_path, data, uninterrupted):
    args = ["--data_path", str(data), *RUN, "--results_dir", str(tmp_path)]
    first = start_cls(*args)
    lock = tmp_path / f".{name_of(*args)}.lock"
    while not (lock.exists() and lock.read_text().strip() == str(first.pid)):  # the first holds the run
        assert first.poll() is None, first.communicate()[1][-2000:]
    second = subprocess.run([sys.executable, str(ROOT / "cls.py"), *NARROW, *args, "--resume"], capture_output=True,
                            text=True, timeout=300, cwd=ROOT)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert second.returncode == 1 and len(second.stderr.strip().splitlines()) == 1, second.stderr
    assert "being trained by another process" in second.stderr and str(first.pid) in second.stderr
    for csv in ("statistics", "layers"):  # the files are one run's: the uninterrupted one's
        a, b = (pd.read_csv(next(folder.glob(f"*_{csv}.csv"))) for folder in (tmp_path, uninterrupted.results))
        pd.testing.assert_frame_equal(a.drop(columns="seconds", errors="ignore"),
                                      b.drop(columns="seconds", errors="ignore"), check_exact=True)
    assert not lock.exists() and not list(tmp_path.glob("*.tmp"))


# -----------------------------------------------------------------------------
# a checkpoint resumes only its own run, on its own data

@pytest.fixture
def stopped_after_one_epoch(monkeypatch, capsys):
    """stop(results, *flags): a run of cls.py in this process, stopped by SIGTERM just after its first epoch's
    end, as a killed job leaves it: its checkpoint, its CSVs and its files saying incomplete."""
    def stop(results, *flags):
        end_epoch = RunRecord.end_epoch

        def then_terminate(record, *args):
            end_epoch(record, *args)
            os.kill(os.getpid(), signal.SIGTERM)  # caught by the run, which stops at its next step

        with monkeypatch.context() as m:
            m.setattr(RunRecord, "end_epoch", then_terminate)
            status, _, err = run_cls_here(capsys, *flags, "--results_dir", str(results))
        assert status == 128 + signal.SIGTERM, err
    return stop


@pytest.mark.parametrize("other", [["--lr", "2e-3"], ["--norm_type", "wn"]])
def test_another_runs_checkpoint_under_this_runs_name_is_refused(tmp_path, data, capsys, other,
                                                                 stopped_after_one_epoch):
    flags = ["--data_path", str(data), *RUN]
    stopped_after_one_epoch(tmp_path / "a", *flags, *other)
    stopped_after_one_epoch(tmp_path / "b", *flags)
    name, foreign = name_of(*flags), name_of(*flags, *other)
    shutil.copy(tmp_path / "a" / f"{foreign}_checkpoint.pth", tmp_path / "b" / f"{name}_checkpoint.pth")
    before = files_of(tmp_path / "b")
    status, _, err = run_cls_here(capsys, *flags, "--results_dir", str(tmp_path / "b"), "--resume")
    assert status == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "another run's checkpoint" in err and foreign in err
    assert files_of(tmp_path / "b") == before
    (tmp_path / "b" / f"{name}_args.json").unlink()  # with args.json gone, the checkpoint still says whose it is
    status, _, err = run_cls_here(capsys, *flags, "--results_dir", str(tmp_path / "b"), "--resume")
    assert status == 1 and "another run's checkpoint" in err


def test_a_checkpoint_whose_recipe_differs_is_refused(tmp_path, data, capsys, stopped_after_one_epoch):
    flags = ["--data_path", str(data), *RUN, "--results_dir", str(tmp_path)]
    stopped_after_one_epoch(tmp_path, *flags[:-2])
    (checkpoint,) = tmp_path.glob("*_checkpoint.pth")
    saved = torch.load(checkpoint, weights_only=False)
    saved["args"]["lr"] = 2e-3  # as if trained at another lr, under this run's name
    torch.save(saved, checkpoint)
    status, _, err = run_cls_here(capsys, *flags, "--resume")
    assert status == 1 and "--lr is 0.001" in err and "0.002" in err and str(checkpoint) in err


def test_other_data_on_resume_is_refused(tmp_path, capsys, stopped_after_one_epoch):
    a = write_cifar(tmp_path / "a", "cifar10", n_train=8, n_test=10, seed=0)
    b = write_cifar(tmp_path / "b", "cifar10", n_train=8, n_test=10, seed=1)
    short = ["--epochs", "2", "--batch_size", "8"]
    flags = [*short, "--results_dir", str(tmp_path / "results")]
    stopped_after_one_epoch(tmp_path / "results", "--data_path", str(a), *short)
    before = files_of(tmp_path / "results")
    status, _, err = run_cls_here(capsys, "--data_path", str(b), *flags, "--resume")
    assert status == 1 and "the data under --data_path" in err and len(err.strip().splitlines()) == 1
    assert files_of(tmp_path / "results") == before
    shutil.copytree(a, tmp_path / "a-moved")  # the same data elsewhere is fine
    status, _, err = run_cls_here(capsys, "--data_path", str(tmp_path / "a-moved"), *flags, "--resume")
    assert status == 0, err


# -----------------------------------------------------------------------------
# nothing non-finite is a result

def test_a_nan_test_loss_marks_the_run_diverged(tmp_path, data, capsys):
    # One step an epoch: the training loss is of the weights before the step, finite; lr 1e9 makes the weights
    # after it, which the evaluation sees, infinite.
    flags = ["--data_path", str(data), "--batch_size", "40", "--epochs", "2", "--lr", "1e9", "--warmup_epochs", "0",
             "--results_dir", str(tmp_path)]
    status, _, err = run_cls_here(capsys, *flags)
    assert status == 1 and "diverged" in err and "test loss" in err and len(err.strip().splitlines()) == 1, err
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert summary.status.tolist() == ["diverged"] and summary.epochs_done.tolist() == [0]
    saved = json.loads(next(tmp_path.glob("*_args.json")).read_text())
    assert saved["status"] == "diverged" and "test loss" in saved["diverged"]
    assert not list(tmp_path.glob("*_model.pth"))
    status, out, _ = run_cls_here(capsys, *flags, "--resume")
    assert status == 0 and "already diverged" in out


def test_wn_init_refuses_a_batch_without_spread(data, capsys, tmp_path):
    status, _, err = run_cls_here(capsys, "--data_path", str(data), "--norm_type", "wn", "--init_images", "1",
                                  "--results_dir", str(tmp_path))
    assert status == 2 and "--init_images" in err and "at least 2" in err
    model = build_model("resnet18", "wn", 10, width=8)
    with pytest.raises(ValueError, match="fc has no spread in 10 of its 10 output channels"):
        data_dependent_init(model, torch.randn(1, 3, 32, 32))


def test_init_images_defaults_to_every_image_where_there_are_fewer_and_is_recorded(tmp_path, data, capsys):
    status, _, err = run_cls_here(capsys, "--data_path", str(data), "--norm_type", "wn", "--epochs", "1",
                                  "--results_dir", str(tmp_path))
    assert status == 0, err
    saved = json.loads(next(tmp_path.glob("*_args.json")).read_text())
    assert (saved["init_images"], saved["init_images_used"]) == (None, 40)  # as given, and as used
    assert pd.read_csv(tmp_path / "summary.csv").init_images_used.tolist() == [40]


# -----------------------------------------------------------------------------
# provenance

def test_results_say_how_they_were_made(uninterrupted):
    saved = json.loads(next(uninterrupted.results.glob("*_args.json")).read_text())
    summary = pd.read_csv(uninterrupted.results / "summary.csv", keep_default_na=False).iloc[0]
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert saved["git_commit"] in (head, f"{head}-dirty") and saved["git_commit"] == summary.git_commit
    assert saved["torch_version"] == torch.__version__ == summary.torch_version
    assert saved["device_name"] == summary.device == "cpu" and summary.cuda_version == ""
    for flag in cls.DEFINING_FLAGS:  # by flag name, in both
        assert flag in saved and flag in summary.index, flag
    assert {"residual_scale", "init_images", "bf16", "sync_bn", "agc", "lr_scaling"} <= set(cls.DEFINING_FLAGS)
    assert saved["status"] == "finished" and saved["data_fingerprint"]


def test_the_summary_can_be_rebuilt_from_the_runs_files(finished, capsys):
    results, _, name, before = finished
    (results / "summary.csv").unlink()
    report.main(["--results_dir", str(results), "--rebuild_summary", "--all"])
    assert "rebuilt the rows of 1 runs" in capsys.readouterr().out
    assert (results / "summary.csv").read_bytes() == before["summary.csv"]


def test_status_is_read_from_the_files(finished):
    results, _, name, _ = finished
    record = RunRecord(results, name, cls.DEFAULTS, enabled=False)
    assert record.status() == "finished" and "finished" in DONE
    (results / "summary.csv").unlink()
    assert record.status() == "finished"
    assert RunRecord(results, "nothing_here", cls.DEFAULTS, enabled=False).status() is None
