"""cls.py end to end on tiny generated datasets, and its answers to bad input."""
import json
import pickle
import shutil
import urllib.error

import pandas as pd
import pytest
import torch

import utils
from conftest import run_cls, run_cls_here, write_cifar, write_imagefolder
from model import build_model


def read_results(results):
    stats = pd.read_csv(next(results.glob("*_statistics.csv")))
    summary = pd.read_csv(results / "summary.csv")
    return stats, summary


def check_run(results, name, data_name, backbone, norm, epochs, num_classes, image_size):
    stats = pd.read_csv(results / f"{name}_statistics.csv")
    assert list(stats.columns) == utils.EPOCH_COLUMNS
    assert stats.epoch.tolist() == list(range(1, epochs + 1))
    assert (stats.lr > 0).all() and (stats.seconds > 0).all()
    assert (stats[["train_loss", "test_loss"]] > 0).all().all()
    for col in ("train_top1", "test_top1", "test_top5"):
        assert stats[col].between(0, 100).all()
    assert (stats.test_top5 >= stats.test_top1).all()

    summary = pd.read_csv(results / "summary.csv")
    assert list(summary.columns) == utils.SUMMARY_COLUMNS and len(summary) == 1
    row = summary.iloc[0]
    assert (row.data_name, row.backbone_type, row.norm_type) == (data_name, backbone, norm)
    assert (row.epochs, row.epochs_done, row.status, row.device) == (epochs, epochs, "finished", "cpu")
    params, flops = utils.count_params_flops(build_model(backbone, norm, num_classes, data_name != "imagenet"),
                                             image_size)
    assert row.params_m == round(params / 1e6, 2) and row.flops == flops
    assert row.final_top1 == stats.test_top1.iloc[-1] and row.best_top1 == stats.test_top1.max()

    args = json.loads((results / f"{name}_args.json").read_text())
    assert (args["data_name"], args["norm_type"], args["epochs"]) == (data_name, norm, epochs)
    checkpoint = torch.load(results / f"{name}_model.pth")
    assert checkpoint["args"] == args
    model = build_model(backbone, norm, num_classes, data_name != "imagenet")
    model.load_state_dict(checkpoint["model"])


@pytest.mark.parametrize("data_name,norm,num_classes", [("cifar10", "wn", 10), ("cifar100", "in", 100)])
def test_cifar_end_to_end(tmp_path, data_name, norm, num_classes):
    data = write_cifar(tmp_path / "data", data_name, n_train=8, n_test=10)
    r = run_cls("--data_name", data_name, "--data_path", str(data), "--norm_type", norm, "--epochs", "2",
                "--batch_size", "8", "--results_dir", str(tmp_path / "results"))
    assert r.returncode == 0, r.stderr
    check_run(tmp_path / "results", f"{data_name}_resnet18_{norm}_8", data_name, "resnet18", norm, 2,
              num_classes, 32)


def test_imagenet_end_to_end(tmp_path):
    data = write_imagefolder(tmp_path / "imagenet", classes=3, per_class=2)
    r = run_cls("--data_name", "imagenet", "--data_path", str(data), "--epochs", "1", "--batch_size", "3",
                "--results_dir", str(tmp_path / "results"))
    assert r.returncode == 0, r.stderr
    check_run(tmp_path / "results", "imagenet_resnet18_bn_3", "imagenet", "resnet18", "bn", 1, 1000, 224)


# -----------------------------------------------------------------------------
# bad input: one line on stderr, a non-zero exit, no traceback, no results file claiming success. Most cases
# run in this process through cls.py's own run_cli, the path its __main__ takes; two run as a user would.

def assert_clean_failure(status, stderr, results, *words):
    assert status != 0
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    for word in words:
        assert word in lines[0], lines[0]
    summary = results / "summary.csv"
    assert not summary.exists() or "finished" not in summary.read_text()
    assert not list(results.glob("*_statistics.csv"))


@pytest.mark.parametrize("flag,value,words", [
    ("--norm_type", "ln", ["--norm_type", "invalid choice", "'ln'"]),
    ("--backbone_type", "vgg16", ["--backbone_type", "invalid choice"]),
    ("--data_name", "mnist", ["--data_name", "invalid choice"]),
    ("--batch_size", "0", ["--batch_size", "at least 1"]),
    ("--epochs", "-3", ["--epochs", "at least 1"]),
    ("--batch_size", "many", ["--batch_size", "invalid"]),
])
def test_bad_flags(tmp_path, cifar10, capsys, flag, value, words):
    status, _, err = run_cls_here(capsys, "--data_path", str(cifar10), "--results_dir", str(tmp_path / "r"),
                                  flag, value)
    assert_clean_failure(status, err, tmp_path / "r", *words)


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
def test_missing_or_corrupt_cifar_batch(tmp_path, cifar10, capsys, how):
    path = corrupt_batch(cifar10, how)
    status, _, err = run_cls_here(capsys, "--data_path", str(cifar10), "--epochs", "1",
                                  "--results_dir", str(tmp_path / "r"))
    assert_clean_failure(status, err, tmp_path / "r", str(path))


def test_data_path_is_a_file(tmp_path, capsys):
    path = tmp_path / "cifar.tar.gz"
    path.write_bytes(b"not a folder")
    status, _, err = run_cls_here(capsys, "--data_path", str(path), "--results_dir", str(tmp_path / "r"))
    assert_clean_failure(status, err, tmp_path / "r", str(path), "is a file")


@pytest.mark.parametrize("missing", ["train", "val"])
def test_imagenet_without_train_or_val(tmp_path, capsys, missing):
    data = write_imagefolder(tmp_path / "imagenet", classes=2, per_class=1)
    shutil.rmtree(data / missing)
    status, _, err = run_cls_here(capsys, "--data_name", "imagenet", "--data_path", str(data),
                                  "--results_dir", str(tmp_path / "r"))
    assert_clean_failure(status, err, tmp_path / "r", str(data / missing))


def test_results_dir_that_cannot_be_written(tmp_path, cifar10, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    results = blocker / "results"  # a folder under a file: unwritable even for root
    status, _, err = run_cls_here(capsys, "--data_path", str(cifar10), "--epochs", "1", "--results_dir", str(results))
    assert_clean_failure(status, err, tmp_path / "nowhere", "--results_dir", str(results))


@pytest.mark.parametrize("bad", ["flag", "batch"])
def test_bad_input_in_a_real_process(tmp_path, cifar10, bad):
    args = ["--norm_type", "ln"] if bad == "flag" else ["--epochs", "1"]
    if bad == "batch":
        corrupt_batch(cifar10, "truncated")
    r = run_cls("--data_path", str(cifar10), "--results_dir", str(tmp_path / "r"), *args)
    assert_clean_failure(r.returncode, r.stderr, tmp_path / "r", "cls.py: error:")


def test_no_network_names_the_folder(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(utils, "download_and_extract_archive", offline)
    with pytest.raises(utils.UserError) as err:
        utils.load_cifar(str(tmp_path / "empty"), "cifar100")
    message = str(err.value)
    assert "cifar-100-python/" in message and str(tmp_path / "empty") in message and "\n" not in message


def test_synthetic_data_runs_end_to_end(tmp_path):
    r = run_cls("--data_name", "synthetic", "--subset", "16", "--epochs", "1", "--batch_size", "8",
                "--results_dir", str(tmp_path / "results"))
    assert r.returncode == 0, r.stderr
    check_run(tmp_path / "results", "synthetic_resnet18_bn_8", "synthetic", "resnet18", "bn", 1, 10, 32)
