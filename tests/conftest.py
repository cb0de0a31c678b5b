"""Tiny datasets in the official on-disk formats, and a helper that runs cls.py as a user would."""
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cls  # noqa: E402
import utils  # noqa: E402


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
    and a list of `labels` (CIFAR-10) or `fine_labels` (CIFAR-100), with str keys as Python 2 wrote them."""
    spec = utils.CIFAR[data_name]
    folder = root / spec["folder"]
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        files = spec[split]
        images, labels = make_images(n * len(files), utils.NUM_CLASSES[data_name], rng, learnable)
        for i, name in enumerate(files):
            part = slice(i * n, (i + 1) * n)
            batch = {"batch_label": f"{split} batch {i}", "filenames": [f"{j}.png" for j in range(n)],
                     "data": images[part].transpose(0, 3, 1, 2).reshape(n, 3072),
                     spec["label_key"]: labels[part].tolist()}
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


def run_cls_here(capsys, *args: str) -> tuple:
    """(exit status, stdout, stderr) of cls.py run in this process, through the same run_cli as its __main__:
    much faster than a new interpreter, for runs that stop early."""
    try:
        utils.run_cli(lambda: cls.main(cls.parse_args(["--device", "cpu", "--workers", "0", *args])), "cls.py")
        status = 0
    except SystemExit as e:
        status = e.code
    out, err = capsys.readouterr()
    return status, out, err


def run_cls(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """cls.py in a fresh process on the CPU, as a user would start it."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(ROOT / "cls.py"), "--device", "cpu", "--workers", "0", *args],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
