"""Fair comparisons: a validation split held out of the training images, the same for every seed, norm and
recipe and never trained on; the best epoch picked on it; and report.py --tune, each norm at its own best
value, chosen on it, with the test accuracy at that value."""
import json
from contextlib import nullcontext

import numpy as np
import pandas as pd
import pytest
import torch

import report
from conftest import NARROW, fake_run, one_run, record_of, run_cls_here, run_here
from recipe import Context, Recipe
from utils import runtime
from utils.comparisons import welch_interval
from utils.data import build_loaders, split_indices

CPU = runtime.Context(0, 1, torch.device("cpu"), nullcontext(), torch.contiguous_format)


def loaders(data, *flags):
    args = one_run(*NARROW, "--data_path", str(data), "--batch_size", "4", *flags)
    return build_loaders(args, CPU)


def everything(loader):
    """Every image and label of an evaluation loader, in its order."""
    batches = list(loader)
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


# -----------------------------------------------------------------------------
# the split

def test_the_split_is_the_same_for_every_seed_norm_and_recipe_and_disjoint_from_the_training_images(data):
    held_out = [everything(loaders(data, "--val_images", "10", *flags).val) for flags in
                ([], ["--seed", "1"], ["--norm_type", "wn"], ["--subset", "20", "--lr", "0.01"])]
    for images, labels in held_out[1:]:
        assert torch.equal(images, held_out[0][0]) and torch.equal(labels, held_out[0][1])
    for subset in (0, 20, 30):  # never a training image, whatever --subset picks
        val, train = split_indices(40, 10, subset)
        assert len(val) == 10 and len(train) == (subset or 30) and not set(val.tolist()) & set(train.tolist())
    val, _ = split_indices(40, 10, 0)
    assert val.tolist() != list(range(10))  # a random 10, not the first (copies rebuilt from class folders are sorted)
    split = loaders(data, "--val_images", "10", "--subset", "20", "--batch_size", "4")
    assert (split.train_images, split.train.num_images, split.val.num_images) == (20, 20, 10)


def test_without_a_split_the_training_images_are_as_before(data):
    for flags in ([], ["--subset", "12"]):  # --subset still picks the same images
        before, now = loaders(data, *flags), loaders(data, *flags, "--val_images", "0")
        assert now.val is None and torch.equal(before.train.labels, now.train.labels)
    assert torch.equal(split_indices(40, 0, 12)[1], split_indices(40, 0, 12)[1])


def test_the_split_defines_the_run_and_its_fingerprint(data):
    plain, split = loaders(data), loaders(data, "--val_images", "10")
    assert plain.fingerprint != split.fingerprint and (plain.train_images, split.train_images) == (40, 30)
    recipe = lambda *f: Recipe.resolve(one_run(*NARROW, *f), Context("cpu", 1, 40))  # noqa: E731
    assert recipe() != recipe("--val_images", "10") and recipe().val_images == 0


@pytest.mark.parametrize("flags,words", [
    (["--val_images", "40"], ["--val_images", "less than 40", "got 40"]),
    (["--val_images", "10", "--subset", "31"], ["--subset", "at most 30", "--val_images holds out 10"]),
])
def test_a_split_the_data_cannot_take_is_a_flag_error(data, tmp_path, capsys, flags, words):
    status, _, err = run_cls_here(capsys, "--data_path", str(data), *flags, "--results_dir", str(tmp_path))
    assert status == 2 and len(err.strip().splitlines()) == 1 and all(w in err for w in words), err
    assert not list(tmp_path.iterdir())


def test_every_epoch_evaluates_the_split_and_the_statistics_carry_it(data, tmp_path, capsys):
    flags = ["--data_path", str(data), "--epochs", "2", "--batch_size", "10", "--val_images", "10"]
    status, out, err = run_cls_here(capsys, *flags, "--results_dir", str(tmp_path))
    assert status == 0, err
    record = record_of(tmp_path, *flags)
    stats = pd.read_csv(record.statistics)
    assert {"val_loss", "val_top1", "val_top5"} <= set(stats.columns)
    assert np.isfinite(stats[["val_loss", "val_top1", "val_top5"]].to_numpy()).all() and len(stats) == 2
    assert ((stats.val_top1 * 10) % 100).round(6).eq(0).all()  # a whole number of its 10 images
    head = json.loads(record.args.read_text())
    assert head["recipe"]["val_images"] == 10 and head["train_images"] == 30
    assert out.count("val top-1") == 2
    status, _, err = run_cls_here(capsys, *flags[:-2], "--results_dir", str(tmp_path / "none"))
    assert status == 0, err
    assert pd.read_csv(record_of(tmp_path / "none", *flags[:-2]).statistics)[["val_top1"]].isna().all().all()


# -----------------------------------------------------------------------------
# the best epoch, and --tune

def test_the_best_epoch_is_picked_on_the_validation_split_where_there_is_one(tmp_path, capsys):
    # the best epoch on val is epoch 2, whose test top-1 is 60; on the test set alone it would be epoch 3's 70
    fake_run(tmp_path, ["--epochs", "3", "--val_images", "5000"], [50.0, 60.0, 70.0], val_top1=[55.0, 80.0, 65.0])
    fake_run(tmp_path, ["--epochs", "3", "--norm_type", "wn"], [50.0, 60.0, 70.0])
    status, _, err = run_here(capsys, lambda: report.main(["--results_dir", str(tmp_path), "--min_epochs", "3"]),
                              "report.py")
    assert status == 0, err
    cells = {line.split("|")[3].strip(): line.split("|")[12].strip() for line in
             (tmp_path / "results.md").read_text().splitlines() if line.startswith("| CIFAR10")}
    assert cells == {"BN": "60.00, val", "WN": "70.00, test"}


GRID = {  # (norm, lr): final (val top-1, test top-1) of seeds 0, 1 and 2
    ("bn", "3e-4"): ([70.0, 71.0, 72.0], [69.0, 70.0, 71.0]),
    ("bn", "1e-3"): ([75.0, 76.0, 77.0], [74.0, 74.5, 75.5]),  # bn's best on val: 1e-3, inside the grid
    ("bn", "3e-3"): ([73.0, 74.0, 74.0], [76.0, 77.0, 78.0]),  # the test set would have picked this one
    ("wn", "3e-4"): ([60.0, 61.0, 62.0], [60.0, 61.0, 62.0]),
    ("wn", "1e-3"): ([65.0, 66.0, 67.0], [64.0, 65.0, 66.0]),
    ("wn", "3e-3"): ([70.0, 70.5, 71.0], [68.0, 69.0, 70.0]),  # wn's best: the largest lr tried, an edge
    ("gn", "1e-3"): ([50.0, 51.0, 52.0], [50.0, 51.0, 52.0]),  # gn: a tie
    ("gn", "3e-3"): ([52.0, 51.0, 50.0], [40.0, 41.0, 42.0]),
}


@pytest.fixture
def tuned(tmp_path, capsys):
    for (norm, lr), (vals, tests) in GRID.items():
        for seed, (val, test) in enumerate(zip(vals, tests, strict=True)):
            fake_run(tmp_path, ["--norm_type", norm, "--lr", lr, "--seed", str(seed), "--epochs", "2",
                                "--val_images", "5000"], [test - 10, test], val_top1=[val - 10, val])
    status, _, err = run_here(capsys, lambda: report.main(["--results_dir", str(tmp_path), "--min_epochs", "2",
                                                           "--tune", "lr"]), "report.py")
    assert status == 0, err
    text = (tmp_path / "tuned.md").read_text()
    header, rows = None, {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if line.startswith("| Data"):
            header = cells
        elif line.startswith("| CIFAR10"):
            rows[cells[2]] = dict(zip(header, cells, strict=True))
    return rows


def mean_std(values):
    return f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}"


def test_tune_chooses_the_best_mean_validation_top1_and_reports_the_test_accuracy_there(tuned):
    bn = tuned["BN"]
    assert bn["lr"] == "0.001" and "edge" not in bn["lr"]  # by hand: means 71.0, 76.0, 73.67
    assert bn["Val Top1"] == mean_std(GRID["bn", "1e-3"][0]) == "76.00 ± 1.00"
    assert bn["Top1 Acc (%)"] == mean_std(GRID["bn", "1e-3"][1])  # the test top-1 at that value, not the best test
    assert bn["Tried (val top-1)"] == "0.0003: 71.00; 0.001: 76.00; 0.003: 73.67" and bn["Seeds"] == "3"
    assert list(tuned["BN"])[:6] == ["Data", "Backbone", "Norm", "Batch Size", "lr", "Val Top1"]


def test_a_value_at_the_edge_of_the_grid_is_flagged(tuned):
    assert tuned["WN"]["lr"] == "0.003 (edge: the largest tried; extend the grid up)"


def test_a_tie_is_shown_as_a_tie(tuned):
    gn = tuned["GN"]
    assert gn["lr"] == "0.001 = 0.003 (a tie)" and gn["Top1 Acc (%)"] == "51.00 ± 1.00 / 41.00 ± 1.00"
    assert gn["Against BN (tuned)"] == "a tie: no single value"


def test_each_norm_is_compared_with_bn_itself_tuned(tuned):
    wn, bn = GRID["wn", "3e-3"][1], GRID["bn", "1e-3"][1]
    low, high = welch_interval(wn, bn)
    assert tuned["WN"]["Against BN (tuned)"] == f"{np.mean(wn) - np.mean(bn):+.2f}"
    assert tuned["WN"]["95% interval"] == f"[{low:+.2f}, {high:+.2f}]" == "[-7.74, -3.59]"
    assert tuned["BN"]["Against BN (tuned)"] == "-"


def test_tune_without_a_validation_split_is_refused(tmp_path, capsys):
    fake_run(tmp_path, ["--epochs", "2", "--lr", "3e-3"], [50.0, 60.0])
    status, _, err = run_here(capsys, lambda: report.main(["--results_dir", str(tmp_path), "--all", "--tune", "lr"]),
                              "report.py")
    assert status == 2 and len(err.strip().splitlines()) == 1 and "--val_images" in err and "--tune" in err
    assert not (tmp_path / "tuned.md").exists() and not (tmp_path / "results.md").exists()


def test_imagenet_holds_its_split_out_of_train_and_tests_on_val(tmp_path):
    from conftest import write_imagefolder
    folders = write_imagefolder(tmp_path / "imagenet", classes=3, per_class=3)
    split = loaders(folders, "--data_name", "imagenet", "--val_images", "3", "--batch_size", "2", "--workers", "0")
    assert (split.train_images, split.val.num_images, split.test.num_images) == (6, 3, 9)
    images, _ = everything(split.val)  # as evaluation sees them: resized and centre-cropped, not augmented
    assert images.shape == (3, 3, 224, 224) and torch.equal(images, everything(split.val)[0])
    assert split.fingerprint != loaders(folders, "--data_name", "imagenet", "--batch_size", "2").fingerprint
