"""cls.py end to end on tiny generated datasets, what it tells a user, and its answers to bad input."""
import json
import pickle
import re
import shutil
import signal
import urllib.error
from contextlib import nullcontext
from pathlib import Path

import pandas as pd
import pytest
import torch

import cls
import report
from conftest import (NARROW, RUN, assert_clean_failure, files_of, one_run, record_of, run_cls, run_cls_here,
                      run_here, start_cls, write_cifar, write_imagefolder)
from model import build_model, count_params_flops
from recipe import IDENTITY
from utils import runtime
from utils.data import build_loaders
from utils.record import EPOCH_COLUMNS
from utils.results import SUMMARY_COLUMNS, read_results


def check_run(record, data_name, backbone, norm, epochs, num_classes, image_size):
    stats = pd.read_csv(record.statistics)
    assert list(stats.columns) == EPOCH_COLUMNS
    assert stats.epoch.tolist() == list(range(1, epochs + 1))
    assert (stats.lr > 0).all() and (stats.seconds > 0).all()
    assert (stats[["train_loss", "test_loss"]] > 0).all().all()
    for col in ("train_top1", "test_top1", "test_top5"):
        assert stats[col].between(0, 100).all()
    assert (stats.test_top5 >= stats.test_top1).all()

    runs, skipped = read_results(record.dir.parent.parent)  # the run as the report reads it
    assert list(runs.columns) == [*SUMMARY_COLUMNS, "recipe"] and len(runs) == 1 and skipped == []
    row = runs.iloc[0]
    assert row["name"] == record.name and row.recipe == record.recipe
    assert (row.data_name, row.backbone_type, row.norm_type) == (data_name, backbone, norm)
    assert (row.epochs, row.epochs_done, row.status, row.device) == (epochs, epochs, "finished", "cpu")
    assert (row.optimizer, row.lr, row.weight_decay, row.lr_schedule, row.seed, row.width) == \
           ("adamw", 1e-3, 0.05, "cosine", 0, 8)  # how the run was made, beside its results
    model = build_model(backbone, norm, num_classes, data_name != "imagenet", width=8)
    params, flops = count_params_flops(model, image_size)
    assert row.params_m == round(params / 1e6, 2) and row.flops == flops
    assert row.final_top1 == stats.test_top1.iloc[-1] and row.best_top1 == stats.test_top1.max()

    head = json.loads(record.args.read_text())
    assert set(head["recipe"]) == set(IDENTITY) and head["recipe"]["world_size"] == 1
    assert [head["flags"][f] for f in ("data_name", "norm_type", "epochs")] == [data_name, norm, epochs]
    weights = torch.load(record.weights)
    assert weights["head"] == head
    pd.testing.assert_frame_equal(pd.DataFrame(weights["history"], columns=EPOCH_COLUMNS).astype(float),
                                  stats.astype(float), check_exact=True)
    model.load_state_dict(weights["model"])
    assert not record.checkpoint.exists()  # a finished run keeps only its weights


@pytest.mark.parametrize("data_name,norm,num_classes", [("cifar10", "wn", 10), ("cifar100", "in", 100)])
def test_cifar_end_to_end(tmp_path, capsys, data_name, norm, num_classes):
    data = write_cifar(tmp_path / "data", data_name, n_train=8, n_test=10)
    flags = ["--data_name", data_name, "--data_path", str(data), "--norm_type", norm, "--epochs", "2", "--batch_size",
             "8", "--init_images", "8"]
    status, _, err = run_cls_here(capsys, *flags, "--results_dir", str(tmp_path / "results"))
    assert status == 0, err
    check_run(record_of(tmp_path / "results", *flags), data_name, "resnet18", norm, 2, num_classes, 32)


def test_imagenet_end_to_end_with_a_head_per_class_folder(tmp_path, capsys):
    data = write_imagefolder(tmp_path / "imagenet", classes=3, per_class=2)
    flags = ["--data_name", "imagenet", "--data_path", str(data), "--epochs", "1", "--batch_size", "3"]
    status, _, err = run_cls_here(capsys, *flags, "--results_dir", str(tmp_path / "results"))
    assert status == 0, err
    check_run(record_of(tmp_path / "results", *flags), "imagenet", "resnet18", "bn", 1, 3, 224)


def test_synthetic_data_runs_end_to_end(tmp_path, capsys):
    flags = ["--data_name", "synthetic", "--subset", "16", "--epochs", "1", "--batch_size", "8"]
    status, _, err = run_cls_here(capsys, *flags, "--results_dir", str(tmp_path / "results"))
    assert status == 0, err
    check_run(record_of(tmp_path / "results", *flags), "synthetic", "resnet18", "bn", 1, 10, 32)


def loaders(*flags):
    args = one_run(*NARROW, *flags)
    return build_loaders(args, runtime.Context(0, 1, torch.device("cpu"), nullcontext(), torch.contiguous_format))


def test_subset_takes_a_fixed_random_n_of_each_split_for_cifar_and_imagenet(tmp_path, data):
    cifar = loaders("--data_path", str(data), "--subset", "12", "--batch_size", "4")
    assert cifar.train_images == 12 and cifar.train.num_images == 12 and cifar.test.num_images == 10  # test: 10
    folders = write_imagefolder(tmp_path / "imagenet", classes=3, per_class=3)
    imagenet = loaders("--data_name", "imagenet", "--data_path", str(folders), "--subset", "4", "--batch_size", "4")
    assert (imagenet.train_images, imagenet.num_classes) == (4, 3)
    assert imagenet.train.num_images == 4 and imagenet.test.num_images == 4


def test_data_path_may_name_the_cifar_folder_itself(tmp_path, data, capsys):
    flags = ["--data_path", str(data / "cifar-10-batches-py"), "--epochs", "1"]
    status, _, err = run_cls_here(capsys, *flags, "--results_dir", str(tmp_path))
    assert status == 0, err
    assert json.loads(record_of(tmp_path, *flags).args.read_text())["flags"]["data_path"] == str(data)  # as used


def test_help_shows_every_default():
    text = " ".join(cls.make_parser().format_help().split())
    for action in cls.make_parser()._actions:
        if action.default is not None and action.dest != "help":
            assert f"(default: {action.default})" in text, action.dest


def test_a_run_in_a_log_prints_progress_within_an_epoch_and_a_last_line(uninterrupted):
    out = uninterrupted.stdout.splitlines()
    epoch_end = next(i for i, line in enumerate(out) if line.startswith("epoch 1/4: train loss"))
    line_re = r"epoch 1/4 +\d+% \(\d+/40 images\): [\d.]+ images/s, loss [\d.]+, top-1 [\d.]+%, epoch ETA [\d:]+"
    progress = [line for line in out[:epoch_end] if re.fullmatch(line_re, line)]
    assert len(progress) >= 5  # 10 steps an epoch: a line at every 10% or more
    record = record_of(uninterrupted.results, *RUN)
    assert out[-1] == (f"{record.name} finished: results in {record.statistics}, {record.layers_csv}; weights in "
                       f"{record.weights}")


def test_keep_checkpoint_keeps_it(tmp_path, data, capsys):
    flags = ["--data_path", str(data), "--epochs", "1", "--keep_checkpoint"]
    status, _, err = run_cls_here(capsys, *flags, "--results_dir", str(tmp_path))
    assert status == 0, err
    checkpoint = torch.load(record_of(tmp_path, *flags).checkpoint, weights_only=False)
    assert checkpoint["state"]["progress"]["epoch"] == 2


# -----------------------------------------------------------------------------
# bad input: one line on stderr, a non-zero exit, no traceback, nothing written that claims a result, and
# what a results folder held before stays byte for byte the same (conftest's earlier and assert_clean_failure).
# Most cases run in this process through cls.py's own run_cli, the path its __main__ takes; some run as a user
# would. More in test_bad_input.py.

@pytest.mark.parametrize("flag,value,words", [
    ("--norm_type", "ln", ["--norm_type", "invalid choice", "'ln'"]),
    ("--backbone_type", "vgg16", ["--backbone_type", "invalid choice"]),
    ("--data_name", "mnist", ["--data_name", "invalid choice"]),
    ("--optimizer", "sgd", ["--optimizer", "invalid choice"]),
    ("--batch_size", "0", ["--batch_size", "at least 1"]),
    ("--epochs", "-3", ["--epochs", "at least 1"]),
    ("--batch_size", "many", ["--batch_size", "invalid"]),
    ("--lr", "-1", ["--lr", "finite number above 0"]),
    ("--lr", "nan", ["--lr", "finite number above 0"]),
    ("--lr", "inf", ["--lr", "finite number above 0"]),
    ("--weight_decay", "-0.1", ["--weight_decay", "at least 0"]),
    ("--warmup_epochs", "-1", ["--warmup_epochs", "at least 0"]),
    ("--subset", "-5", ["--subset", "at least 0"]),
    ("--wn_residual_scale", "-1", ["--wn_residual_scale", "'auto' or"]),
    # limits that only the data knows: 40 training images
    ("--subset", "41", ["--subset", "at most 40", "got 41"]),
    ("--batch_size", "41", ["--batch_size", "at most 40", "got 41"]),
    ("--init_images", "41", ["--init_images", "at most 40", "got 41"]),
])
def test_bad_flags(data, earlier, capsys, flag, value, words):
    status, _, err = run_cls_here(capsys, "--data_path", str(data), "--norm_type", "wn", "--results_dir",
                                  str(earlier[0]), flag, value)
    assert_clean_failure(status, err, earlier, *words)
    assert status == 2  # argparse's status for a bad flag


def test_an_init_batch_that_does_not_fit_in_memory_is_one_line(data, earlier, capsys, monkeypatch):
    def out_of_memory(model, x):  # as CUDA's allocator answers 50,000 images through a ResNet at once
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 PiB")

    monkeypatch.setattr(cls, "data_dependent_init", out_of_memory)
    status, _, err = run_cls_here(capsys, "--data_path", str(data), "--norm_type", "wn", "--init_images", "40",
                                  "--results_dir", str(earlier[0]))
    assert_clean_failure(status, err, earlier, "--init_images", "40 init images do not fit in the memory of cpu")


def test_a_batch_larger_than_a_subset_is_refused(data, earlier, capsys):
    status, _, err = run_cls_here(capsys, "--data_path", str(data), "--subset", "16", "--batch_size", "100000",
                                  "--results_dir", str(earlier[0]))
    assert_clean_failure(status, err, earlier, "--batch_size", "at most 16")


def corrupt_batch(folder, how):
    path = folder / "cifar-10-batches-py" / "data_batch_3"
    if how == "missing":
        path.unlink()
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[:5000])
    elif how == "garbage":
        path.write_bytes(b"this is not a pickle" * 100)
    elif how == "wrong_keys":
        path.write_bytes(pickle.dumps({"data": b"\0" * 3072, "coarse": [1]}))
    return path


@pytest.mark.parametrize("how", ["missing", "truncated", "garbage", "wrong_keys"])
def test_missing_or_corrupt_cifar_batch(cifar10, earlier, capsys, how):
    path = corrupt_batch(cifar10, how)
    status, _, err = run_cls_here(capsys, "--data_path", str(cifar10), "--epochs", "1", "--results_dir",
                                  str(earlier[0]))
    assert_clean_failure(status, err, earlier, str(path))


def test_data_path_is_a_file(tmp_path, earlier, capsys):
    path = tmp_path / "cifar.tar.gz"
    path.write_bytes(b"not a folder")
    status, _, err = run_cls_here(capsys, "--data_path", str(path), "--results_dir", str(earlier[0]))
    assert_clean_failure(status, err, earlier, str(path), "is a file")


@pytest.mark.parametrize("content", [b"", b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe" * 50, b"a,b\n1,2\n", b'x"\n"y,\n'])
def test_an_unreadable_recipe_json_is_named_and_its_runs_left_alone(data, earlier, capsys, content):
    recipe_json = record_of(earlier[0], "--data_path", str(data), *RUN).dir.parent / "recipe.json"
    recipe_json.write_bytes(content)
    before = files_of(earlier[0])
    for resume in ([], ["--resume"]):  # its own recipe: refused, not trained again elsewhere
        status, _, err = run_cls_here(capsys, "--data_path", str(data), *RUN, "--results_dir", str(earlier[0]), *resume)
        assert_clean_failure(status, err, (earlier[0], before), str(recipe_json), "cannot read", "repair it")
    status, _, err = run_cls_here(capsys, "--data_path", str(data), "--norm_type", "in", "--epochs", "1",
                                  "--results_dir", str(earlier[0]))  # another recipe: trains beside it
    assert status == 0, err
    assert {k: v for k, v in files_of(earlier[0]).items() if k in before} == before
    status, _, err = run_here(capsys, lambda: report.main(["--results_dir", str(earlier[0]), "--all"]), "report.py")
    assert status == 0 and str(recipe_json) in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("missing", ["train", "val"])
def test_imagenet_without_train_or_val(tmp_path, earlier, capsys, missing):
    data = write_imagefolder(tmp_path / "imagenet", classes=2, per_class=1)
    shutil.rmtree(data / missing)
    status, _, err = run_cls_here(capsys, "--data_name", "imagenet", "--data_path", str(data),
                                  "--results_dir", str(earlier[0]))
    assert_clean_failure(status, err, earlier, str(data / missing))


def test_imagenet_train_and_val_with_other_classes(tmp_path, earlier, capsys):
    data = write_imagefolder(tmp_path / "imagenet", classes=3, per_class=1)
    (data / "val" / "n00000002").rename(data / "val" / "n00000007")
    status, _, err = run_cls_here(capsys, "--data_name", "imagenet", "--data_path", str(data),
                                  "--results_dir", str(earlier[0]))
    assert_clean_failure(status, err, earlier, "different class folders", "n00000002", "n00000007")


@pytest.mark.parametrize("workers", ["0", "1"])
def test_an_unreadable_image_is_named(tmp_path, capsys, workers):
    data = write_imagefolder(tmp_path / "imagenet", classes=2, per_class=2)
    bad = data / "train" / "n00000001" / "x.jpg"
    bad.write_bytes(b"this is not an image")
    results = tmp_path / "results"
    status, _, err = run_cls_here(capsys, "--data_name", "imagenet", "--data_path", str(data), "--batch_size", "5",
                                  "--epochs", "1", "--workers", workers, "--no-layer_stats", "--results_dir",
                                  str(results))
    assert status == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert str(bad) in err and "cannot read image" in err
    assert not results.exists()  # read before the run's folder is made: no file says it began


def test_results_dir_that_cannot_be_written(tmp_path, data, earlier, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    results = blocker / "results"  # a folder under a file: unwritable even for root
    status, _, err = run_cls_here(capsys, "--data_path", str(data), "--epochs", "1", "--results_dir", str(results))
    assert_clean_failure(status, err, earlier, "--results_dir", str(results))


@pytest.mark.parametrize("bad", ["flag", "batch"])
def test_bad_input_in_a_real_process(cifar10, earlier, bad):
    args = ["--norm_type", "ln"] if bad == "flag" else ["--epochs", "1"]
    if bad == "batch":
        corrupt_batch(cifar10, "truncated")
    r = run_cls("--data_path", str(cifar10), "--results_dir", str(earlier[0]), *args)
    assert_clean_failure(r.returncode, r.stderr, earlier, "cls.py: error:")


def loading_torch(pid: int) -> bool:
    """Whether process pid has mapped torch's C++ library: cls.py is then in the seconds of its imports, which
    come after it set its Ctrl-C handler."""
    try:
        return "libtorch_cpu" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def test_ctrl_c_before_training_is_one_line(data, earlier):
    proc = start_cls("--data_path", str(data), "--results_dir", str(earlier[0]), "--norm_type", "in")
    while not loading_torch(proc.pid):
        assert proc.poll() is None, proc.communicate()[1]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert_clean_failure(proc.returncode, err, earlier, "interrupted by Ctrl-C")
    assert proc.returncode == 128 + signal.SIGINT


def test_no_network_names_the_folder(tmp_path, monkeypatch):
    import torchvision.datasets.utils
    from utils.cli import UserError
    from utils.data import load_cifar

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", offline)
    with pytest.raises(UserError) as err:
        load_cifar(str(tmp_path / "empty"), "cifar100")
    message = str(err.value)
    assert "cifar-100-python/" in message and str(tmp_path / "empty") in message and "\n" not in message
