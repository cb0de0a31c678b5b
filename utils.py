"""Data, metrics, profiling and I/O for cls.py and the scripts beside it."""
import copy
import itertools
import json
import os
import pickle
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import thop
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, Subset
from torchvision import datasets, transforms
from torchvision.datasets.utils import download_and_extract_archive

from model import WNConv2d, WNLinear


class UserError(Exception):
    """Bad input or environment, or a run stopped on purpose: cls.py prints the message as one line on
    stderr and exits with exit_code."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class RunDiverged(UserError):
    """A NaN or infinite loss: the run is over, and sweep.py goes on to the next configuration."""


def run_cli(main, prog: str) -> None:
    """How every script ends: a UserError is one line on stderr and its exit code, never a traceback."""
    try:
        main()
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


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
                    md5="c58f30108f718f92721af3b95e74349a", label_key="labels",
                    train=[f"data_batch_{i}" for i in range(1, 6)], test=["test_batch"]),
    "cifar100": dict(folder="cifar-100-python", url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                     md5="eb9058c3a382ffc7106e4002c42a8d85", label_key="fine_labels",
                     train=["train"], test=["test"]),
}
# Per-channel mean and std of each training set on the 0-1 scale.
MEAN_STD = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
MEAN_STD["synthetic"] = MEAN_STD["cifar10"]
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "imagenet": 1000, "synthetic": 10}
IMAGE_SIZE = {"cifar10": 32, "cifar100": 32, "imagenet": 224, "synthetic": 32}
DEFAULT_DATA_PATH = {"cifar10": "data", "cifar100": "data", "imagenet": "/home/data/imagenet/ILSVRC2012",
                     "synthetic": None}
# Evaluation never depends on the batch (BN uses running stats there), so it runs large whatever --batch_size is.
EVAL_BATCH_SIZE = 500


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
        if labels.min() < 0 or labels.max() >= NUM_CLASSES[data_name]:
            raise UserError(f"{root / spec['folder']}: labels outside 0..{NUM_CLASSES[data_name] - 1}")
        splits[split] = (images, labels)
    return splits


class CifarLoader:
    """Batches from a uint8 split held on the training device, augmented and normalized there in one go.

    This replaces Dataset + DataLoader: per-image PIL transforms in worker processes cannot feed a GPU at
    small batch sizes, while the whole of CIFAR-10 is 150 MB of uint8. Augmentation is torchvision's
    RandomCrop(32, padding=4) with zero fill and RandomHorizontalFlip, drawn per image. The padded images
    are kept beside their mirror images, so a batch is a single gather from a view of every crop of every
    image. (A crop of the mirror at column offset c is the mirror of the crop at 2 pad - c, so with
    uniform offsets the distribution is exactly torchvision's.)

    A train epoch is a fresh permutation, so every image is seen once, and the last partial batch is kept.
    The permutation and every image's crop and flip are drawn up front from (seed, epoch) alone, so a run
    resumed mid-epoch replays them, and they do not depend on the number of processes. Under DDP, rank r of
    `world` takes positions r, r + world, ... of the permutation, wrapped around to a multiple of `world` as
    DistributedSampler pads, so every rank runs the same number of steps and the union of the ranks' k-th
    batches is the k-th batch of one process with `world` times the batch. Evaluation shards without padding.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, mean_std: tuple,
                 train: bool, device: torch.device, seed: int = 0, rank: int = 0, world: int = 1):
        self.pad = 4 if train else 0
        padded = F.pad(images, (self.pad,) * 4)  # (N, 3, 32 + 2 pad, 32 + 2 pad) uint8
        images = torch.cat([padded, padded.flip(3)]) if train else padded
        self.windows = images.to(device).unfold(2, 32, 1).unfold(3, 32, 1)  # (rows, 3, 2p + 1, 2p + 1, 32, 32)
        self.labels = labels.to(device)
        self.batch_size, self.train, self.seed, self.rank, self.world = batch_size, train, seed, rank, world
        self.epoch, self.start_step = 0, 0
        mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in mean_std)
        self.scale, self.shift = 1 / (255 * std), -mean / std  # (x / 255 - mean) / std as one addcmul
        n = len(labels)
        self.num_images = -(-n // world) if train else len(range(rank, n, world))  # this rank's share

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return -(-self.num_images // self.batch_size)

    def _plan(self, epoch: int, rank: int, world: int) -> tuple:
        """Rank's image indices for the epoch (M,), and the rows, tops and lefts of their crops."""
        n, device = len(self.labels), self.labels.device
        if not self.train:
            image = torch.arange(rank, n, world, device=device)
            return image, image, torch.zeros_like(image), torch.zeros_like(image)
        gen = torch.Generator(device).manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(n, device=device, generator=gen)
        top, left = torch.randint(0, 2 * self.pad + 1, (2, n), device=device, generator=gen)
        flip = torch.rand(n, device=device, generator=gen) < 0.5
        mine = torch.arange(rank, -(-n // world) * world, world, device=device) % n
        image = order[mine]
        return image, image + n * flip[mine], top[mine], left[mine]

    def _images(self, row: torch.Tensor, top: torch.Tensor, left: torch.Tensor) -> torch.Tensor:
        x = self.windows[row, :, top, left]  # (B, 3, 32, 32) uint8
        return torch.addcmul(self.shift, x.float(), self.scale)

    def __iter__(self):
        image, row, top, left = self._plan(self.epoch, self.rank, self.world)
        for step in range(self.start_step, len(self)):
            batch = slice(step * self.batch_size, (step + 1) * self.batch_size)
            yield self._images(row[batch], top[batch], left[batch]), self.labels[image[batch]]

    def init_batch(self, n: int) -> torch.Tensor:
        """The first n images of epoch 0 as a single process draws them: the same on every rank, and
        never a training step, since training starts at epoch 1."""
        _, row, top, left = self._plan(0, 0, 1)
        return self._images(row[:n], top[:n], left[:n])


def synthetic_splits(n_train: int = 50_000, n_test: int = 10_000, num_classes: int = 10) -> dict:
    """Random uint8 images with CIFAR's shape, like pytorch/examples' --dummy: for speed, not accuracy."""
    gen = torch.Generator().manual_seed(0)
    return {split: (torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen),
                    torch.randint(0, num_classes, (n,), generator=gen))
            for split, n in (("train", n_train), ("test", n_test))}


def imagenet_loaders(root: str, batch_size: int, workers: int, seed: int, rank: int = 0, world: int = 1) -> tuple:
    """ImageFolder train/ and val/ under root, sharded over `world` ranks, read by DataLoader workers."""
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
    sampler = ResumableSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    val_shard = Subset(val_set, range(rank, len(val_set), world))  # no padding: every image counted once
    return (EpochLoader(train_set, batch_size, sampler=sampler, **kwargs),
            EpochLoader(val_shard, EVAL_BATCH_SIZE, **kwargs))


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start an epoch part-way, for a run resumed mid-epoch."""
    start_index = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start_index, None)

    def __len__(self) -> int:
        return self.num_samples - self.start_index


class EpochLoader(DataLoader):
    """A DataLoader with CifarLoader's set_epoch and num_images, so the loop treats both alike."""

    @property
    def num_images(self) -> int:
        return getattr(self.sampler, "num_samples", len(self.dataset))

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        if isinstance(self.sampler, ResumableSampler):
            self.sampler.set_epoch(epoch)
            self.sampler.start_index = start_step * self.batch_size

    def init_batch(self, n: int) -> torch.Tensor:
        """As CifarLoader.init_batch: the first n images of epoch 0 in a single process's order."""
        order = DistributedSampler(self.dataset, num_replicas=1, rank=0, shuffle=True, seed=self.sampler.seed)
        return torch.stack([self.dataset[i][0] for i in itertools.islice(order, n)])


def load_splits(args) -> dict:
    """CIFAR-shaped data as {'train': (images, labels), 'test': (...)} uint8 tensors, cut to --subset."""
    splits = synthetic_splits() if args.data_name == "synthetic" else load_cifar(args.data_path, args.data_name)
    if args.subset:
        splits = {split: subset(*pair, args.subset) for split, pair in splits.items()}
    return splits


def subset(images: torch.Tensor, labels: torch.Tensor, n: int) -> tuple:
    """A fixed random n of a split, the same for every --seed: not the first n, since a split may be sorted
    by class (copies rebuilt from class folders are)."""
    keep = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))[:n]
    return images[keep], labels[keep]


def build_loaders(args, device: torch.device, rank: int = 0, world: int = 1) -> tuple:
    """(train, test) loaders for args.data_name, this rank's share; each yields (images (B, 3, H, W) float,
    labels (B,)) and has set_epoch(epoch, start_step) and num_images."""
    if args.data_name == "imagenet":
        return imagenet_loaders(args.data_path, args.batch_size, args.workers, args.seed, rank, world)
    splits, mean_std = load_splits(args), MEAN_STD[args.data_name]
    return (CifarLoader(*splits["train"], args.batch_size, mean_std, True, device, args.seed, rank, world),
            CifarLoader(*splits["test"], EVAL_BATCH_SIZE, mean_std, False, device, rank=rank, world=world))


# -----------------------------------------------------------------------------
# metrics

def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple = (1, 5)) -> torch.Tensor:
    """(B, classes), (B,) -> (len(ks),) counts of labels within each top-k, kept on the device."""
    top = logits.topk(max(ks), dim=1).indices == labels[:, None]  # (B, max k)
    return torch.stack([top[:, :k].any(1).sum() for k in ks])


# -----------------------------------------------------------------------------
# results I/O

EPOCH_COLUMNS = ["epoch", "lr", "train_loss", "train_top1", "test_loss", "test_top1", "test_top5", "seconds"]
CONFIG_COLUMNS = ["data_name", "backbone_type", "norm_type", "batch_size"]
SUMMARY_COLUMNS = CONFIG_COLUMNS + ["epochs", "epochs_done", "status", "params_m", "flops", "best_top1",
                                    "best_top5", "final_top1", "final_top5", "world_size", "device"]
DONE = ("finished", "diverged")  # statuses a resume leaves alone


def run_name(args) -> str:
    return "_".join(str(getattr(args, c)) for c in CONFIG_COLUMNS)


def _replace(path: Path, write) -> None:
    """Write whole to a temporary name, then rename: a crash never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def write_csv(df: pd.DataFrame, path: Path) -> None:
    _replace(path, lambda tmp: df.to_csv(tmp, index=False))


def read_summary(path: Path) -> pd.DataFrame:
    return pd.read_csv(path) if path.exists() else pd.DataFrame(columns=SUMMARY_COLUMNS)


def _same_config(df: pd.DataFrame, row: dict) -> pd.Series:
    return (df[CONFIG_COLUMNS].astype(str) == pd.Series({c: str(row[c]) for c in CONFIG_COLUMNS})).all(axis=1)


class RunFiles:
    """Every file of one run, under results_dir. With enabled=False (DDP ranks other than 0) the writing
    methods do nothing, so the training loop needs no rank checks."""

    def __init__(self, results_dir: str, args, enabled: bool = True):
        self.dir, self.name, self.enabled = Path(results_dir), run_name(args), enabled
        self.config = {c: getattr(args, c) for c in CONFIG_COLUMNS}
        self.statistics = self.dir / f"{self.name}_statistics.csv"
        self.args = self.dir / f"{self.name}_args.json"
        self.checkpoint = self.dir / f"{self.name}_checkpoint.pth"
        self.weights = self.dir / f"{self.name}_model.pth"
        self.summary = self.dir / "summary.csv"
        if enabled:
            self._check_writable()

    def _check_writable(self) -> None:
        try:
            os.makedirs(self.dir, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.dir):
                pass
        except OSError as e:
            raise UserError(f"cannot write to --results_dir {self.dir} ({e.strerror}); pick another folder") from None

    def status(self):
        """This configuration's status in summary.csv, or None if it has no row."""
        summary = read_summary(self.summary)
        rows = summary[_same_config(summary, self.config)]
        return rows.status.iloc[0] if len(rows) else None

    def started(self) -> bool:
        return self.statistics.exists() or self.checkpoint.exists()

    def load_checkpoint(self, device: torch.device):
        if not self.checkpoint.exists():
            return None
        try:
            return torch.load(self.checkpoint, map_location=device, weights_only=False)
        except Exception as e:  # a truncated or foreign file: say which, do not guess
            raise UserError(f"cannot read checkpoint {self.checkpoint} ({type(e).__name__}); "
                            f"delete it to start the run over") from None

    def save_checkpoint(self, state: dict) -> None:
        if self.enabled:
            _replace(self.checkpoint, lambda tmp: torch.save(state, tmp))

    def save_weights(self, state: dict) -> None:
        if self.enabled:
            _replace(self.weights, lambda tmp: torch.save(state, tmp))

    def write_args(self, args: dict) -> None:
        if self.enabled:
            _replace(self.args, lambda tmp: tmp.write_text(json.dumps(args, indent=2) + "\n"))

    def write_history(self, history: list) -> None:
        if self.enabled:
            write_csv(pd.DataFrame(history, columns=EPOCH_COLUMNS), self.statistics)

    def write_summary(self, row: dict) -> None:
        """Insert or replace this configuration's row in summary.csv."""
        if self.enabled:
            old = read_summary(self.summary)
            new = pd.concat([old[~_same_config(old, row)], pd.DataFrame([row], columns=SUMMARY_COLUMNS)],
                            ignore_index=True)
            write_csv(new.sort_values(CONFIG_COLUMNS, ignore_index=True), self.summary)
