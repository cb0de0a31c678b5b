"""A run's identity and its record: one recipe, one folder; distinct recipes apart; a run's own files as the truth
of where it stands; one process per run; checkpoints that resume only their own run on their own data; nothing
non-finite recorded as a result; and the provenance of every result."""
import json
import os
import shutil
import signal
import subprocess
import sys

import pandas as pd
import pytest
import torch

import recipe as recipes
from conftest import NARROW, ROOT, RUN, files_of, one_run, record_of, run_cls_here, start_cls, write_cifar
from model import build_model, data_dependent_init
from recipe import IDENTITY, Context, Recipe
from utils.record import RunRecord, recipe_folder
from waiting import wait_until

CPU = Context("cpu", 1, 40)  # the tests' data: 40 training images


def recipe_of(*flags, device="cpu", world=1, images=40):
    return Recipe.resolve(one_run(*NARROW, *flags), Context(device, world, images))


@pytest.fixture
def finished(tmp_path, uninterrupted, data):
    """A copy of the uninterrupted run's folder, its cls.py flags, its record and its files' bytes."""
    results = tmp_path / "results"
    shutil.copytree(uninterrupted.results, results)
    args = ["--data_path", str(data), *RUN]
    return results, args, record_of(results, *args), files_of(results)


# -----------------------------------------------------------------------------
# one recipe, one folder: a recipe is what the run uses

@pytest.mark.parametrize("a,b", [
    (["--epochs", "1", "--warmup_epochs", "0.5"], ["--epochs", "1", "--warmup_epochs", "5"]),  # the cap
    (["--norm_type", "wn"], ["--norm_type", "wn", "--init_images", "40"]),  # every training image, as the default
    (["--norm_type", "wn"], ["--norm_type", "wn", "--residual_scale", "0.5"]),  # what auto gives ResNet-18
    (["--norm_type", "sws"], ["--norm_type", "sws", "--wn_residual_scale", "0.5"]),  # and under its old name
    ([], ["--no-bf16"]),  # bf16 does nothing on the CPU
    ([], ["--sync_bn"]),  # nor sync_bn on one process
    ([], ["--residual_scale", "0", "--init_images", "8"]),  # nor these for bn
    ([], ["--lr_base_batch", "64"]),  # nor the base batch without --lr_scaling
    ([], ["--lr", "1e-3", "--seed", "0", "--weight_decay", "0.050"]),  # the defaults, typed otherwise
])
def test_command_lines_that_train_the_same_thing_are_one_recipe(a, b):
    assert recipe_of(*a) == recipe_of(*b)
    assert recipe_of(*a).name(CPU) == recipe_of(*b).name(CPU)


@pytest.mark.parametrize("a,b", [
    (["--lr", "0.002"], ["--lr", "0.0020000001"]),  # full precision
    (["--norm_type", "wn", "--residual_scale", "0.5"], ["--norm_type", "wn", "--residual_scale", "0.25"]),
    (["--norm_type", "wn", "--init_images", "8"], ["--norm_type", "wn"]),
    (["--epochs", "4", "--warmup_epochs", "1"], ["--epochs", "4", "--warmup_epochs", "2"]),
    (["--backbone_type", "resnet34", "--norm_type", "wn"], ["--backbone_type", "resnet34", "--norm_type", "wn",
                                                            "--residual_scale", "0.25"]),  # auto is per stage
])
def test_recipes_that_differ_in_what_they_train_are_apart_and_so_are_their_names(a, b):
    assert recipe_of(*a) != recipe_of(*b)
    assert recipe_of(*a).name(CPU) != recipe_of(*b).name(CPU)


def another(value):
    if isinstance(value, str):
        return {"cifar10": "cifar100", "resnet18": "resnet34", "wn_mbn": "wn", "adamw": "adam", "linear": "sqrt",
                "cosine": "step", "auto": 0.1}[value]
    return not value if isinstance(value, bool) else value + 1


def test_every_recipe_flag_but_the_seed_defines_the_recipe_where_it_does_something():
    base = dict(recipes.DEFAULTS, norm_type="wn_mbn", lr_scaling="linear", init_images=8)
    for flag in IDENTITY:
        if flag == "world_size":
            continue
        changed = {**base, flag: another(base[flag])}
        assert Recipe.resolve(changed, Context("cuda", 2, 40)) != Recipe.resolve(base, Context("cuda", 2, 40)), flag
    assert Recipe.resolve(base, Context("cuda", 2, 40)) != Recipe.resolve(base, Context("cuda", 1, 40))  # processes
    assert recipe_of("--seed", "1") == recipe_of("--seed", "2")  # a seed is a run of the recipe


def test_names_are_readable_and_never_hold_the_seed(tmp_path, data):
    assert recipe_of().name(CPU) == "cifar10_resnet18_bn_32_width8"
    assert recipe_of("--norm_type", "wn", "--lr", "3e-3", "--seed", "4").name(CPU) == \
        "cifar10_resnet18_wn_32_lr0.003_width8"
    assert recipe_of("--epochs", "4", "--subset", "2000").name(CPU) == \
        "cifar10_resnet18_bn_32_epochs4_width8_subset2000"
    assert recipe_of(device="cuda").name(Context("cuda", 1, 40)) == "cifar10_resnet18_bn_32_width8"
    assert recipe_of("--no-bf16", device="cuda").name(Context("cuda", 1, 40)) == \
        "cifar10_resnet18_bn_32_width8_no_bf16"
    record = record_of(tmp_path, "--data_path", str(data), "--seed", "7")
    assert (record.dir.parent.name, record.dir.name) == ("cifar10_resnet18_bn_32_width8", "seed7")


def test_a_changed_default_neither_renames_an_old_recipe_nor_merges_a_new_one_with_it(tmp_path, monkeypatch):
    old = recipe_of()  # weight decay 0.05, the default today
    old_folder = recipe_folder(tmp_path, old, CPU, create=True)
    assert old_folder.name == "cifar10_resnet18_bn_32_width8"
    monkeypatch.setitem(recipes.DEFAULTS, "weight_decay", 0.1)  # a later version changes the default
    new = Recipe.resolve(dict(recipes.DEFAULTS, width=8), CPU)
    assert old.name(CPU) == "cifar10_resnet18_bn_32_weight_decay0.05_width8"  # what today's code would call it
    assert recipe_folder(tmp_path, old, CPU) == old_folder  # found by its recipe.json, not by its name
    new_folder = recipe_folder(tmp_path, new, CPU, create=True)
    assert new_folder != old_folder and new_folder.name == "cifar10_resnet18_bn_32_width8_weight_decay0.1"
    assert Recipe.from_json(json.loads((new_folder / "recipe.json").read_text())) == new
    assert Recipe.from_json(json.loads((old_folder / "recipe.json").read_text())) == old


def test_a_recipe_json_of_an_older_version_reads_with_todays_names():
    saved = recipe_of("--norm_type", "wn").to_json()
    saved["wn_residual_scale"] = saved.pop("residual_scale")
    assert Recipe.from_json(saved) == recipe_of("--norm_type", "wn")
    with pytest.raises(ValueError, match="no lr"):
        Recipe.from_json({k: v for k, v in recipe_of().to_json().items() if k != "lr"})
    with pytest.raises(ValueError, match="an unknown colour"):
        Recipe.from_json({**recipe_of().to_json(), "colour": "red"})


# -----------------------------------------------------------------------------
# seeds side by side

def test_two_seeds_of_one_recipe_live_side_by_side_and_each_resumes(tmp_path, data, capsys):
    runs = {seed: ["--data_path", str(data), "--epochs", "1", "--batch_size", "8", "--seed", seed] for seed in "01"}
    for flags in runs.values():
        status, _, err = run_cls_here(capsys, *flags, "--results_dir", str(tmp_path))
        assert status == 0, err
    records = {seed: record_of(tmp_path, *flags) for seed, flags in runs.items()}
    assert records["0"].dir.parent == records["1"].dir.parent == next(tmp_path.glob("*/recipe.json")).parent
    heads = {seed: json.loads(r.args.read_text()) for seed, r in records.items()}
    assert (heads["0"]["seed"], heads["1"]["seed"]) == (0, 1) and heads["0"]["recipe"] == heads["1"]["recipe"]
    stats = {seed: pd.read_csv(r.statistics) for seed, r in records.items()}
    assert stats["0"].train_loss.iloc[0] != stats["1"].train_loss.iloc[0]  # really two trainings
    before = files_of(tmp_path)
    for flags in runs.values():
        status, out, _ = run_cls_here(capsys, *flags, "--results_dir", str(tmp_path), "--resume")
        assert status == 0 and "already finished" in out
    assert files_of(tmp_path) == before


# -----------------------------------------------------------------------------
# the run's own files are the truth

@pytest.mark.parametrize("edit", ["args_say_incomplete", "args_say_diverged", "summary_says_incomplete"])
def test_a_run_whose_weights_say_finished_is_never_trained_again(finished, capsys, edit):
    results, args, record, _ = finished
    if edit == "summary_says_incomplete":
        (results / "summary.csv").write_text(f"name,status\n{record.name},incomplete\n")
    else:
        head = json.loads(record.args.read_text())
        record.args.write_text(json.dumps({**head, "status": edit.split("_")[-1]}))
    before = files_of(results)
    status, out, err = run_cls_here(capsys, *args, "--results_dir", str(results), "--resume")
    assert status == 0 and "already finished" in out and "resuming" not in out, err
    assert files_of(results) == before
    assert record.status() == "finished"


def test_a_finished_run_whose_weights_are_gone_says_so(finished, capsys):
    results, args, record, _ = finished
    record.weights.unlink()
    status, out, err = run_cls_here(capsys, *args, "--results_dir", str(results), "--resume")
    assert status == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "model.pth" in err and "missing" in err and "move" in err and "already" not in out


def test_status_is_read_from_the_runs_files_alone(finished, data):
    results, args, record, _ = finished
    assert record.status() == "finished"
    assert record_of(results, *args, "--seed", "9").status() is None  # another seed: no files yet
    assert not list(results.glob("*/seed9"))  # and asking made none


# -----------------------------------------------------------------------------
# one process per run

def test_two_commands_for_one_run_one_trains_and_the_other_refuses(tmp_path, data, uninterrupted):
    args = ["--data_path", str(data), *RUN, "--results_dir", str(tmp_path)]
    first = start_cls(*args)
    record = record_of(tmp_path, *args)
    wait_until(lambda: record.lock.exists() and record.lock.read_text().strip() == str(first.pid), first,
               what="the first command holding the run")
    first.send_signal(signal.SIGSTOP)  # held mid-run, however fast it trains, while the second tries
    second = subprocess.run([sys.executable, str(ROOT / "cls.py"), *NARROW, *args, "--resume"], capture_output=True,
                            text=True, timeout=300, cwd=ROOT)
    first.send_signal(signal.SIGCONT)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert second.returncode == 1 and len(second.stderr.strip().splitlines()) == 1, second.stderr
    assert "being trained by another process" in second.stderr and str(first.pid) in second.stderr
    theirs = record_of(uninterrupted.results, *args)
    for csv in ("statistics", "layers_csv"):  # the files are one run's: the uninterrupted one's
        a, b = (pd.read_csv(getattr(r, csv)) for r in (record, theirs))
        pd.testing.assert_frame_equal(a.drop(columns="seconds", errors="ignore"),
                                      b.drop(columns="seconds", errors="ignore"), check_exact=True)
    assert not record.lock.exists() and not list(tmp_path.rglob("*.tmp"))


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
        return record_of(results, *flags)
    return stop


@pytest.mark.parametrize("other", [["--lr", "2e-3"], ["--norm_type", "wn"], ["--seed", "4"]])
def test_another_runs_checkpoint_in_this_runs_folder_is_refused(tmp_path, data, capsys, other,
                                                                stopped_after_one_epoch):
    flags = ["--data_path", str(data), *RUN]
    foreign = stopped_after_one_epoch(tmp_path / "a", *flags, *other)
    mine = stopped_after_one_epoch(tmp_path / "b", *flags)
    shutil.copy(foreign.checkpoint, mine.checkpoint)
    mine.args.unlink()  # with args.json gone, the checkpoint still says whose it is
    before = files_of(tmp_path / "b")
    status, _, err = run_cls_here(capsys, *flags, "--results_dir", str(tmp_path / "b"), "--resume")
    assert status == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "is another run's" in err and foreign.name in err and other[0] in err
    assert files_of(tmp_path / "b") == before


def test_a_checkpoint_whose_recipe_differs_is_refused(tmp_path, data, capsys, stopped_after_one_epoch):
    flags = ["--data_path", str(data), *RUN]
    record = stopped_after_one_epoch(tmp_path, *flags)
    saved = torch.load(record.checkpoint, weights_only=False)
    saved["head"]["recipe"]["lr"] = 2e-3  # as if trained at another lr, in this run's folder
    torch.save(saved, record.checkpoint)
    status, _, err = run_cls_here(capsys, *flags, "--results_dir", str(tmp_path), "--resume")
    assert status == 1 and "--lr is 0.002, this run's 0.001" in err and str(record.checkpoint) in err


def test_other_data_on_resume_is_refused_and_moved_data_is_not(tmp_path, capsys, stopped_after_one_epoch):
    a = write_cifar(tmp_path / "a", "cifar10", n_train=8, n_test=10, seed=0)
    b = write_cifar(tmp_path / "b", "cifar10", n_train=8, n_test=10, seed=1)
    short = ["--epochs", "2", "--batch_size", "8"]
    stopped_after_one_epoch(tmp_path / "results", "--data_path", str(a), *short)
    before = files_of(tmp_path / "results")
    flags = [*short, "--results_dir", str(tmp_path / "results"), "--resume"]
    status, _, err = run_cls_here(capsys, "--data_path", str(b), *flags)
    assert status == 1 and "the data under --data_path" in err and len(err.strip().splitlines()) == 1
    assert files_of(tmp_path / "results") == before
    shutil.copytree(a, tmp_path / "a-moved")  # the same data elsewhere is fine
    status, _, err = run_cls_here(capsys, "--data_path", str(tmp_path / "a-moved"), *flags)
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
    record = record_of(tmp_path, *flags)
    head = json.loads(record.args.read_text())
    assert head["status"] == "diverged" and "test loss" in head["diverged"] and head["epochs_done"] == 0
    assert not record.weights.exists() and record.status() == "diverged"
    status, out, _ = run_cls_here(capsys, *flags, "--resume")
    assert status == 0 and "already diverged" in out


def test_wn_init_refuses_a_batch_without_spread(data, capsys, tmp_path):
    status, _, err = run_cls_here(capsys, "--data_path", str(data), "--norm_type", "wn", "--init_images", "1",
                                  "--results_dir", str(tmp_path))
    assert status == 2 and "--init_images" in err and "at least 2" in err
    status, _, err = run_cls_here(capsys, "--data_path", str(data), "--norm_type", "wn", "--subset", "1",
                                  "--results_dir", str(tmp_path))  # the real limit: the init's two images
    assert status == 2 and "--subset" in err and "at least 2" in err and "got 1" in err and not list(tmp_path.iterdir())
    model = build_model("resnet18", "wn", 10, width=8)
    with pytest.raises(ValueError, match="fc has no spread in 10 of its 10 output channels"):
        data_dependent_init(model, torch.randn(1, 3, 32, 32))


def test_init_images_defaults_to_every_image_where_there_are_fewer_and_is_recorded(tmp_path, data, capsys):
    flags = ["--data_path", str(data), "--norm_type", "wn", "--epochs", "1", "--results_dir", str(tmp_path)]
    status, _, err = run_cls_here(capsys, *flags)
    assert status == 0, err
    head = json.loads(record_of(tmp_path, *flags).args.read_text())
    assert (head["flags"]["init_images"], head["recipe"]["init_images"]) == (None, 40)  # as given, and as used


# -----------------------------------------------------------------------------
# provenance

def test_results_say_how_they_were_made(uninterrupted, data):
    record = record_of(uninterrupted.results, "--data_path", str(data), *RUN)
    head = json.loads(record.args.read_text())
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    assert head["git_commit"] in (commit, f"{commit}-dirty") and head["torch_version"] == torch.__version__
    assert head["device_name"] == "cpu" and head["cuda_version"] == "" and head["data_fingerprint"]
    assert Recipe.from_json(head["recipe"]) == record.recipe and head["seed"] == 3 and head["status"] == "finished"
    assert set(head["flags"]) == set(recipes.RECIPE_FLAGS + recipes.RESUMABLE)  # every flag, as given
    assert json.loads((record.dir.parent / "recipe.json").read_text()) == head["recipe"]
    assert torch.load(record.weights, weights_only=False)["head"] == head
