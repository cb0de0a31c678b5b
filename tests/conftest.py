"""Tiny datasets in the official on-disk formats, helpers that run cls.py as a user would, the one
uninterrupted run that several tests compare against, the deselection of the tests that need what a machine
may lack (CUDA, a SLURM cluster, root), and that cluster.

Tests that check the machinery train networks of --width 8, about 60x cheaper than the papers' 64; the
params/FLOPs tests use the real widths."""
import contextlib
import functools
import io
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cls  # noqa: E402
import slurm_cluster  # noqa: E402
from model import build_model, count_params_flops  # noqa: E402
from utils.cli import run_cli  # noqa: E402
from utils.data import DATASETS  # noqa: E402
from recipe import Context, Recipe, split_runs  # noqa: E402
from utils.record import EpochRow, RunRecord  # noqa: E402

NARROW = ["--width", "8", "--device", "cpu", "--workers", "0"]  # a later --width or --workers overrides these
# As this process runs: runs compared to the last digit must sum in the same order, on as many threads.
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}


# -----------------------------------------------------------------------------
# CUDA, SLURM and root tests: deselected, and said so in the header and the summary line, where there is no CUDA
# device, where no SLURM cluster can start (tests/slurm_cluster.py: the binaries installed, and root), or where
# the tests do not run as root (a full disk on a tmpfs, tests/test_bad_input.py)

def missing_environments() -> dict:
    """{marker: why its tests cannot run here}."""
    missing = {"slurm": slurm_cluster.unavailable()}
    if not torch.cuda.is_available():
        missing["cuda"] = "no CUDA device"
    if os.geteuid() != 0:
        missing["root"] = "not root, so no tmpfs to fill"
    return {marker: why for marker, why in missing.items() if why}


def pytest_collection_modifyitems(config, items):
    missing = missing_environments()
    deselected = [item for item in items if any(marker in item.keywords for marker in missing)]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if item not in deselected]


def pytest_report_header(config):
    missing = missing_environments()
    lines = [f"{why}: the tests marked {marker} are deselected" for marker, why in missing.items()]
    if "cuda" not in missing:
        lines.append(f"CUDA device: {torch.cuda.get_device_name()}")
    if "slurm" not in missing:
        lines.append("SLURM: the tests marked slurm run on a one-node cluster started for them")
    return lines


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A one-node SLURM cluster, started once for all the tests that need it; its .env (SLURM_CONF) reaches it."""
    cluster = slurm_cluster.Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


# -----------------------------------------------------------------------------
# datasets

def make_images(n: int, num_classes: int, rng: np.random.Generator, learnable: bool) -> tuple:
    """(n, 32, 32, 3) uint8 images and their labels. Learnable images are one flat colour per class plus
    noise, so crops and flips keep the class and a small net learns it within a few epochs."""
    labels = rng.integers(0, num_classes, n)
    if not learnable:
        return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), labels
    colours = rng.integers(30, 226, (num_classes, 3))
    noise = rng.integers(-25, 26, (n, 32, 32, 3))
    return np.clip(colours[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8), labels


def write_cifar(root: Path, data_name: str, n_train: int = 24, n_test: int = 12, learnable: bool = False,
                seed: int = 0) -> Path:
    """The official python layout: pickled dicts of `data` (N, 3072) uint8 rows, R then G then B planes,
    and a list of `labels` (CIFAR-10) or `fine_labels` (CIFAR-100), with str keys as Python 2 wrote them.
    n_train images go in each training batch file (5 of them for CIFAR-10)."""
    spec = DATASETS[data_name]
    folder = root / spec.files.folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        files = getattr(spec.files, split)
        images, labels = make_images(n * len(files), spec.num_classes, rng, learnable)
        for i, name in enumerate(files):
            part = slice(i * n, (i + 1) * n)
            batch = {"batch_label": f"{split} batch {i}", "filenames": [f"{j}.png" for j in range(n)],
                     "data": images[part].transpose(0, 3, 1, 2).reshape(n, 3072),
                     spec.files.label_key: labels[part].tolist()}
            with open(folder / name, "wb") as f:
                pickle.dump(batch, f, protocol=2)
    return root


def write_imagefolder(root: Path, classes: int = 3, per_class: int = 3, seed: int = 0) -> Path:
    """ImageNet's layout: train/ and val/ of class folders holding real JPEG files of mixed sizes."""
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                h, w = rng.integers(40, 80, 2)
                pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.JPEG", quality=90)
    return root


@pytest.fixture
def cifar10(tmp_path):
    return write_cifar(tmp_path / "data", "cifar10")


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """40 training and 10 test images of CIFAR-10's layout, shared by the tests that do not change them."""
    return write_cifar(tmp_path_factory.mktemp("cifar") / "data", "cifar10", n_train=8, n_test=10)


# -----------------------------------------------------------------------------
# running cls.py

def one_run(*flags: str):
    """The flags of the one run these cls.py flags name."""
    (run,) = split_runs(cls.parse_args(list(flags)))
    return run


def record_of(results, *flags: str, world: int = 1, device: str = "cpu") -> RunRecord:
    """The record of the run that these cls.py flags name under results, on a device of this type: where the
    test finds the run's files, as cls.py does, never by a typed file name."""
    return RunRecord.of_args(one_run(*NARROW, *flags, "--results_dir", str(results)), device, world)


def run_cls_here(capsys, *args: str) -> tuple:
    """(exit status, stdout, stderr) of cls.py run in this process, through the same run_cli as its __main__,
    on a narrow net: much faster than a new interpreter."""
    return run_here(capsys, lambda: cls.main(cls.parse_args([*NARROW, *args])), "cls.py")


def run_here(capsys, main, prog) -> tuple:
    """(exit status, stdout, stderr) of a script's main, run through run_cli as its __main__ runs it."""
    try:
        run_cli(main, prog)
        status = 0
    except SystemExit as e:
        status = e.code
    out, err = capsys.readouterr()
    return status, out, err


def run_cls(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """cls.py in a fresh process on the CPU, as a user would start it, on a narrow net."""
    return subprocess.run([sys.executable, str(ROOT / "cls.py"), *NARROW, *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV, cwd=ROOT)


def start_cls(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "cls.py"), *NARROW, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)


def fake_run(results, flags: list, top1: list, top5: list = None, status: str = "finished", device: str = "cpu",
             fingerprint: str = "f" * 16, commit: str = "0" * 40, params: int = 11_173_962, flops: int = 556_669_952,
             train_images: int = 50_000, val_top1: list = None) -> RunRecord:
    """A run of these cls.py flags whose epochs end at top1 (top5) on the test set, and at val_top1 on the
    validation split of a run with --val_images, written through the run's own record as a real run writes it,
    without training: what the report reads. status: finished, diverged (after the epochs given) or
    incomplete."""
    args = one_run(*flags, "--results_dir", str(results))
    context = Context(device, 1, train_images)
    record = RunRecord.of(results, Recipe.resolve(args, context), args.seed, context, enabled=True)
    head = {"name": record.name, "recipe": record.recipe.to_json(), "seed": args.seed, "flags": vars(args),
            "device": device, "device_name": "NVIDIA H100 80GB HBM3" if device == "cuda" else "cpu",
            "peak_lr": record.recipe.peak_lr(), "data_fingerprint": fingerprint, "train_images": train_images,
            "params": params, "flops": flops, "git_commit": commit, "torch_version": torch.__version__,
            "cuda_version": ""}
    top5 = top5 or [min(100.0, t + 40) for t in top1]
    val_top1 = val_top1 or [None] * len(top1)
    with record:
        record.start(head, None)
        for epoch, (t1, t5, v1) in enumerate(zip(top1, top5, val_top1, strict=True), 1):
            val = (None, None, None) if v1 is None else (0.6, v1, min(100.0, v1 + 40))
            row = EpochRow(epoch, 1e-3, 1.0, 50.0, 0.5, t1, t5, 9.0 * epoch, *val)
            if status == "finished" and epoch == args.epochs:
                record.finish(row, [], {}, {})
            else:
                record.end_epoch(row, [], {})
        if status == "diverged":
            record.diverge("the loss became nan")
    return record


# The run the reliability and layer-statistics tests compare against: 40 images at batch 4, 10 steps an epoch.
RUN = ["--epochs", "4", "--batch_size", "4", "--seed", "3"]


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory, data):
    """RUN, uninterrupted: its results folder, its record, and its stdout, which went to a buffer as it goes to
    a log file. The runs compared with it in fresh processes check that a run does not depend on the process."""
    results = tmp_path_factory.mktemp("uninterrupted")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        cls.main(cls.parse_args([*NARROW, "--data_path", str(data), *RUN, "--results_dir", str(results)]))
    return SimpleNamespace(results=results, record=record_of(results, "--data_path", str(data), *RUN),
                           stdout=stdout.getvalue())


@functools.lru_cache(maxsize=None)
def counts(backbone: str, norm: str, num_classes: int = 10, cifar_stem: bool = True) -> tuple:
    """(parameters, MACs) of a real-width network, built once for all the tests that count it."""
    return count_params_flops(build_model(backbone, norm, num_classes, cifar_stem), 32 if cifar_stem else 224)


# -----------------------------------------------------------------------------
# bad input: one line on stderr, a non-zero exit, no traceback, and an earlier run's files byte for byte the same

@pytest.fixture
def earlier(tmp_path, uninterrupted):
    """A results folder that already holds a finished run, and its files' bytes."""
    results = tmp_path / "results"
    shutil.copytree(uninterrupted.results, results)
    return results, files_of(results)


def files_of(folder, locks: bool = True):
    """{path under folder: bytes} of every file in it; without the lock files, which a killed process leaves
    behind and which lock nothing, where locks is False."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and (locks or p.name != ".lock")}


def assert_clean_failure(status, stderr, earlier, *words):
    results, before = earlier
    assert status != 0
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert files_of(results) == before
