"""Data, metrics, profiling and I/O for cls.py and the scripts beside it."""
import copy
import json
import os
import pickle
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import thop
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler
from torchvision import datasets, transforms
from torchvision.datasets.utils import download_and_extract_archive

from model import WNConv2d, WNLinear


class UserError(Exception):
    """Bad input or environment: cls.py prints the message as one line and exits non-zero."""


# -----------------------------------------------------------------------------
# profiling

# thop picks a counter by exact type, so it counts our WN layers as 0 MACs unless told; they expose `weight`,
# `bias`, `groups` and `in_features` as thop's own Conv2d and Linear counters expect.
THOP_CUSTOM_OPS = {WNConv2d: thop.vision.basic_hooks.count_convNd, WNLinear: thop.vision.basic_hooks.count_linear}


def count_params_flops(model: nn.Module, image_size: int) -> tuple:
    """(parameters, thop multiply-accumulates for one image), the convention of the original table."""
    params = sum(p.numel() for p in model.parameters())
    probe = copy.deepcopy(model)  # thop adds total_ops/total_params buffers, and older releases leave them
    device = next(model.parameters()).device
    x = torch.zeros(1, 3, image_size, image_size, device=device)
    flops, _ = thop.profile(probe, inputs=(x,), custom_ops=THOP_CUSTOM_OPS, verbose=False)
    return params, int(flops)


def human(n: float) -> str:
    """556670000 -> '556.67M', as the original table prints FLOPs."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


# -----------------------------------------------------------------------------
# datasets

CIFAR = {
    "cifar10": dict(folder="cifar-10-batches-py", url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                    md5="c58f30108f718f92721af3b95e74349a", label_key="labels", num_classes=10,
                    train=[f"data_batch_{i}" for i in range(1, 6)], test=["test_batch"]),
    "cifar100": dict(folder="cifar-100-python", url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                     md5="eb9058c3a382ffc7106e4002c42a8d85", label_key="fine_labels", num_classes=100,
                     train=["train"], test=["test"]),
}
# Per-channel mean and std of each training set on the 0-1 scale.
MEAN_STD = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "imagenet": 1000}
DEFAULT_DATA_PATH = {"cifar10": "data", "cifar100": "data", "imagenet": "/home/data/imagenet/ILSVRC2012"}
# Evaluation never depends on the batch (BN uses running stats there), so it runs large whatever --batch_size is.
EVAL_BATCH_SIZE = 500
IMAGE_SIZE = {"cifar10": 32, "cifar100": 32, "imagenet": 224}


def _read_cifar_batch(path: Path, label_key: str) -> tuple:
    """One official python batch -> uint8 images (N, 3, 32, 32) and int64 labels (N,)."""
    if not path.is_file():
        raise UserError(f"missing CIFAR batch {path}; delete {path.parent} to download it again, "
                        f"or copy the official files there")
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="latin1")
        images = torch.from_numpy(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels = torch.as_tensor(batch[label_key], dtype=torch.int64)
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
    except Exception as e:  # any failure to decode this one file means the file is bad
        raise UserError(f"corrupt or truncated CIFAR batch {path} ({type(e).__name__}: {e}); "
                        f"delete {path.parent} to download it again") from None
    return images, labels


def _download_cifar(root: Path, spec: dict) -> None:
    try:
        download_and_extract_archive(spec["url"], str(root), md5=spec["md5"])
    except Exception as e:  # URLError, HTTPError, a bad archive: all mean "put the files there yourself"
        raise UserError(f"cannot download {spec['url']} ({e}); put {spec['folder']}/ in {root} "
                        f"and run again") from None


def load_cifar(root: str, data_name: str) -> dict:
    """{'train': (images, labels), 'test': (images, labels)} from torchvision's root layout, as uint8 tensors.

    We read the pickles ourselves: torchvision's CIFAR10 insists on the official md5 sums and hands out PIL
    images one at a time, and the device-resident loader wants the whole split as one tensor.
    """
    spec, root = CIFAR[data_name], Path(root)
    if root.exists() and not root.is_dir():
        raise UserError(f"--data_path {root} is a file; give the folder that holds {spec['folder']}/")
    if not (root / spec["folder"]).is_dir():
        _download_cifar(root, spec)
    splits = {}
    for split in ("train", "test"):
        parts = [_read_cifar_batch(root / spec["folder"] / name, spec["label_key"]) for name in spec[split]]
        images, labels = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        if labels.min() < 0 or labels.max() >= spec["num_classes"]:
            raise UserError(f"{root / spec['folder']}: labels outside 0..{spec['num_classes'] - 1}")
        splits[split] = (images, labels)
    return splits


class CifarLoader:
    """Batches from a uint8 split held on the training device, augmented and normalized there in one go.

    This replaces Dataset + DataLoader: per-image PIL transforms in worker processes cannot feed a GPU at
    small batch sizes, while the whole of CIFAR-10 is 150 MB of uint8. Train batches follow a fresh
    permutation each epoch, so every image is seen once; the last partial batch is kept. Augmentation is
    torchvision's RandomCrop(32, padding=4) (zero fill) and RandomHorizontalFlip, drawn per image.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, mean_std: tuple,
                 train: bool, device: torch.device, seed: int = 0):
        pad = 4 if train else 0
        self.images = F.pad(images, (pad,) * 4).to(device)  # (N, 3, 32 + 2 pad, 32 + 2 pad) uint8
        self.labels = labels.to(device)
        self.batch_size, self.train, self.seed, self.epoch = batch_size, train, seed, 0
        mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) * 255 for v in mean_std)
        self.mean, self.std = mean, std

    def set_epoch(self, epoch: int) -> None:
        """The order and the augmentation of an epoch depend only on (seed, epoch), so a resume replays them."""
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self.num_images // self.batch_size)

    @property
    def num_images(self) -> int:
        return len(self.labels)

    def __iter__(self):
        n, device = len(self.labels), self.labels.device
        gen = torch.Generator(device).manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(n, device=device, generator=gen) if self.train else torch.arange(n, device=device)
        for idx in order.split(self.batch_size):
            x = self.crop_flip(self.images[idx], gen) if self.train else self.images[idx]
            yield (x.float() - self.mean) / self.std, self.labels[idx]

    @staticmethod
    def crop_flip(x: torch.Tensor, gen: torch.Generator, size: int = 32) -> torch.Tensor:
        """(B, C, size + 2p, size + 2p) -> (B, C, size, size): a random crop per image, mirrored with p=0.5.

        One gather does both: row and column indices per image, the columns reversed for flipped images.
        """
        b, c, h, w = x.shape
        device = x.device
        top = torch.randint(0, h - size + 1, (b, 1), device=device, generator=gen)
        left = torch.randint(0, w - size + 1, (b, 1), device=device, generator=gen)
        flip = torch.rand(b, 1, device=device, generator=gen) < 0.5
        i = torch.arange(size, device=device)
        rows = top + i  # (B, size)
        cols = left + torch.where(flip, size - 1 - i, i)  # (B, size)
        batch = torch.arange(b, device=device).view(b, 1, 1, 1)
        chan = torch.arange(c, device=device).view(1, c, 1, 1)
        return x[batch, chan, rows.view(b, 1, size, 1), cols.view(b, 1, 1, size)]


def imagenet_loaders(root: str, batch_size: int, workers: int, seed: int) -> tuple:
    """ImageFolder train/ and val/ under root, read by DataLoader workers into pinned memory."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise UserError(f"--data_path {root} is a file; give the folder that holds train/ and val/")
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise UserError(f"{root / split} is not a folder; --data_path must hold ImageNet's train/ and val/ "
                            f"as ImageFolder class folders")
    normalize = transforms.Normalize(*MEAN_STD["imagenet"])
    train_tf = transforms.Compose([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), normalize])
    eval_tf = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(), normalize])
    try:
        train_set = datasets.ImageFolder(str(root / "train"), train_tf)
        val_set = datasets.ImageFolder(str(root / "val"), eval_tf)
    except (FileNotFoundError, OSError) as e:  # ImageFolder raises these for a folder with no class images
        raise UserError(f"cannot read ImageNet under {root}: {e}") from None
    kwargs = dict(num_workers=workers, pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0)
    sampler = DistributedSampler(train_set, num_replicas=1, rank=0, shuffle=True, seed=seed)
    return (EpochLoader(train_set, batch_size, sampler=sampler, **kwargs),
            EpochLoader(val_set, EVAL_BATCH_SIZE, **kwargs))


class EpochLoader(DataLoader):
    """A DataLoader with CifarLoader's set_epoch and num_images, so the loop treats both alike."""

    @property
    def num_images(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        if isinstance(self.sampler, DistributedSampler):
            self.sampler.set_epoch(epoch)


def build_loaders(args, device: torch.device) -> tuple:
    """(train, test) loaders for args.data_name; each yields (images (B, 3, H, W) float, labels (B,))."""
    if args.data_name == "imagenet":
        return imagenet_loaders(args.data_path, args.batch_size, args.workers, args.seed)
    splits, mean_std = load_cifar(args.data_path, args.data_name), MEAN_STD[args.data_name]
    return (CifarLoader(*splits["train"], args.batch_size, mean_std, True, device, args.seed),
            CifarLoader(*splits["test"], EVAL_BATCH_SIZE, mean_std, False, device))


# -----------------------------------------------------------------------------
# metrics

def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple = (1, 5)) -> torch.Tensor:
    """(B, classes), (B,) -> (len(ks),) counts of labels within each top-k, kept on the device."""
    top = logits.topk(max(ks), dim=1).indices == labels[:, None]  # (B, max k)
    return torch.stack([top[:, :k].any(1).sum() for k in ks])


# -----------------------------------------------------------------------------
# results I/O: every file is written whole to a temporary name, then renamed, so a crash never leaves half

EPOCH_COLUMNS = ["epoch", "lr", "train_loss", "train_top1", "test_loss", "test_top1", "test_top5", "seconds"]
CONFIG_COLUMNS = ["data_name", "backbone_type", "norm_type", "batch_size"]
SUMMARY_COLUMNS = CONFIG_COLUMNS + ["epochs", "epochs_done", "status", "params_m", "flops", "best_top1",
                                    "best_top5", "final_top1", "final_top5", "device"]


def run_name(args) -> str:
    return "_".join(str(getattr(args, c)) for c in CONFIG_COLUMNS)


def check_writable(folder: str) -> None:
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UserError(f"cannot write to --results_dir {folder} ({e.strerror}); pick another folder") from None


def _replace(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def write_csv(df: pd.DataFrame, path: Path) -> None:
    _replace(path, lambda tmp: df.to_csv(tmp, index=False))


def write_json(obj: dict, path: Path) -> None:
    _replace(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


def update_summary(path: Path, row: dict) -> None:
    """Insert or replace the row of one configuration in summary.csv."""
    old = pd.read_csv(path) if path.exists() else pd.DataFrame(columns=SUMMARY_COLUMNS)
    same = (old[CONFIG_COLUMNS].astype(str) == pd.Series({c: str(row[c]) for c in CONFIG_COLUMNS})).all(axis=1)
    new = pd.concat([old[~same], pd.DataFrame([row], columns=SUMMARY_COLUMNS)], ignore_index=True)
    write_csv(new.sort_values(CONFIG_COLUMNS, ignore_index=True), path)
