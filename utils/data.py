"""The datasets: CIFAR read into device-resident loaders and synthetic images; ImageNet is utils/imagenet.py."""
import copy
import functools
import hashlib
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from utils.cli import UserError, flag_error


@dataclass(frozen=True)
class CifarFiles:
    folder: str
    url: str
    md5: str
    label_key: str
    train: tuple
    test: tuple


@dataclass(frozen=True)
class Dataset:
    label: str  # in tables and plots
    image_size: int
    mean_std: tuple  # per-channel mean and std of the training set, on the 0-1 scale
    default_path: Optional[str]
    num_classes: Optional[int] = None  # None: one class per folder of train/
    files: Optional[CifarFiles] = None  # the official python batches, for CIFAR


CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
DATASETS = {  # the keys are cls.py's --data_name choices
    "cifar10": Dataset("CIFAR10", 32, CIFAR10_STATS, "data", 10, CifarFiles(
        "cifar-10-batches-py", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a", "labels", tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",))),
    "cifar100": Dataset("CIFAR100", 32, ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)), "data", 100, CifarFiles(
        "cifar-100-python", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85", "fine_labels", ("train",), ("test",))),
    "imagenet": Dataset("ImageNet", 224, ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
                        "/home/data/imagenet/ILSVRC2012"),
    # Random images with CIFAR-10's shape, like pytorch/examples' --dummy: for speed, not accuracy.
    "synthetic": Dataset("synthetic", 32, CIFAR10_STATS, None, 10),
}
# Evaluation never depends on the batch (BN uses running stats there), so it runs large whatever --batch_size is.
EVAL_BATCH_SIZE = 500


@dataclass
class Data:
    """This rank's train, test and validation loaders (val None without --val_images). Each yields (images
    (B, 3, H, W) float, labels (B,)) and has set_epoch(epoch, start_step), num_images and init_batch(n)."""
    train: object
    test: object
    val: Optional[object]
    num_classes: int
    train_images: int  # trained on, all ranks together: after --val_images holds out and --subset picks
    fingerprint: str  # of the whole dataset as read, and of the split: a resume must see the same data


def resolve_path(data_name: str, path: Optional[str]) -> Optional[str]:
    """--data_path as it is used: the dataset's default when none is given, and for CIFAR the folder above
    cifar-10-batches-py/ (or cifar-100-python/) when that folder itself is named. Refuses a file."""
    spec = DATASETS[data_name]
    root = Path(path or spec.default_path or ".")
    if root.is_file():
        holds = f"{spec.files.folder}/" if spec.files else "train/ and val/"
        raise UserError(f"--data_path {root} is a file; give the folder that holds {holds}")
    if spec.files and root.name == spec.files.folder and root.is_dir():
        root = root.parent
    return None if spec.default_path is None and path is None else str(root)


def fixed_sample(total: int, n: int) -> torch.Tensor:
    """The indices of a fixed random n of `total` items, the same for every --seed: not the first n, since a
    split may be sorted by class (copies rebuilt from class folders are)."""
    return torch.randperm(total, generator=torch.Generator().manual_seed(0))[:n]


def split_indices(total: int, val_images: int, subset: int) -> tuple:
    """(validation, training) indices into a training split of `total` images, the same for every seed, norm
    and recipe: in fixed_sample's fixed random order, the first --val_images are held out, never trained on,
    and the next --subset are the training images; without --subset every other image is, in its own order.
    (None, None) for the whole split untouched, without either flag."""
    if not (val_images or subset):
        return None, None
    order = fixed_sample(total, total)
    train = order[val_images:val_images + subset] if subset else order[val_images:].sort().values
    return order[:val_images], train


def check_sizes(args, train_images: int, world: int) -> None:
    """The limits the data puts on --val_images, --subset and --batch_size, as argparse would word them."""
    if args.val_images >= train_images:
        raise flag_error("--val_images", f"must be less than {train_images}, the training images of "
                                         f"{args.data_name}, so that some are left to train on, got {args.val_images}")
    left = train_images - args.val_images
    if args.subset > left:
        held_out = f" once --val_images holds out {args.val_images}" if args.val_images else ""
        raise flag_error("--subset", f"must be at most {left}, the training images of {args.data_name}{held_out}, "
                                     f"got {args.subset}")
    per_process = -(-(args.subset or left) // world)
    if args.batch_size > per_process:
        raise flag_error("--batch_size", f"must be at most {per_process}, the training images per process, "
                                         f"got {args.batch_size}")


def build_loaders(args, ctx) -> Data:
    """The loaders for args.data_name, cut to --subset, for this rank of ctx."""
    if args.data_name == "imagenet":
        from utils.imagenet import imagenet_data  # which imports this module
        return imagenet_data(args, ctx)
    spec = DATASETS[args.data_name]
    with ctx.main_first():  # rank 0 downloads, if the files are not there
        splits = synthetic_splits() if args.data_name == "synthetic" else load_cifar(args.data_path, args.data_name)
    (images, labels), (test_images, test_labels) = splits["train"], splits["test"]
    check_sizes(args, len(labels), ctx.world)
    val, train = split_indices(len(labels), args.val_images, args.subset)
    fingerprint = tensors_fingerprint(images, labels, test_images, test_labels, *([val] if args.val_images else []))
    if args.subset:  # the whole test split where it has fewer
        test = fixed_sample(len(test_labels), min(args.subset, len(test_labels)))
        test_images, test_labels = test_images[test], test_labels[test]
    kwargs = dict(mean_std=spec.mean_std, device=ctx.device, rank=ctx.rank, world=ctx.world)
    evaluated = dict(batch_size=EVAL_BATCH_SIZE, train=False, **kwargs)
    train_images, train_labels = (images, labels) if train is None else (images[train], labels[train])
    return Data(CifarLoader(train_images, train_labels, args.batch_size, train=True, seed=args.seed, **kwargs),
                CifarLoader(test_images, test_labels, **evaluated),
                CifarLoader(images[val], labels[val], **evaluated) if args.val_images else None,
                spec.num_classes, len(train_labels), fingerprint)


@functools.lru_cache(maxsize=None)
def train_size(data_name: str, data_path: Optional[str]) -> int:
    """The training images of data_name's whole training split, before --subset, the one number of the data
    that a recipe's defaults depend on (--init_images's): CIFAR's read (and downloaded where absent), ImageNet's
    class folders listed."""
    if data_name == "synthetic":
        return len(synthetic_splits()["train"][1])
    if data_name == "imagenet":
        from torchvision import datasets  # see load_cifar
        from utils.imagenet import imagenet_folders
        return len(imagenet_folders(Path(data_path), datasets)[0])
    return len(load_cifar(data_path, data_name)["train"][1])


def tensors_fingerprint(*tensors: torch.Tensor) -> str:
    """sha1 of the tensors' bytes: 0.2 s for CIFAR's 180 MB, and any changed pixel or label changes it."""
    digest = hashlib.sha1()
    for t in tensors:
        digest.update(t.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


# -----------------------------------------------------------------------------
# CIFAR

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


def load_cifar(root: str, data_name: str) -> dict:
    """{'train': (images, labels), 'test': (images, labels)} from torchvision's root layout, as uint8 tensors.

    We read the pickles ourselves: torchvision's CIFAR10 insists on the official md5 sums and hands out PIL
    images one at a time, and the device-resident loader wants the whole split as one tensor.
    """
    spec, root = DATASETS[data_name], Path(root)
    files = spec.files
    if not (root / files.folder).is_dir():
        # torchvision is imported where it is used: it costs seconds of imports (it loads torch._dynamo),
        # which a CIFAR run spends only to download.
        from torchvision.datasets.utils import download_and_extract_archive
        try:
            download_and_extract_archive(files.url, str(root), md5=files.md5)
        except Exception as e:  # URLError, HTTPError, a bad archive: all mean "put the files there yourself"
            raise UserError(f"cannot download {files.url} ({e}); put {files.folder}/ in {root} "
                            f"and run again") from None
    splits = {}
    for split in ("train", "test"):
        parts = [_read_cifar_batch(root / files.folder / name, files.label_key) for name in getattr(files, split)]
        images, labels = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        if labels.min() < 0 or labels.max() >= spec.num_classes:
            raise UserError(f"{root / files.folder}: labels outside 0..{spec.num_classes - 1}")
        splits[split] = (images, labels)
    return splits


def synthetic_splits(n_train: int = 50_000, n_test: int = 10_000, num_classes: int = 10) -> dict:
    """Random uint8 images with CIFAR's shape."""
    gen = torch.Generator().manual_seed(0)
    return {split: (torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen),
                    torch.randint(0, num_classes, (n,), generator=gen))
            for split, n in (("train", n_train), ("test", n_test))}


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

    def reseeded(self, seed: int) -> "CifarLoader":
        """The same images on the device, drawn in another seed's order, crops and flips: a packed run's."""
        other = copy.copy(self)
        other.seed = seed
        return other

    def __len__(self) -> int:
        return -(-self.num_images // self.batch_size)

    def _plan(self, epoch: int, rank: int, world: int) -> tuple:
        """Rank's image indices for the epoch (M,), and the rows, tops and lefts of their crops. Drawn on the
        CPU, so that they are the same whatever the device (a run may resume on another)."""
        n, device = len(self.labels), self.labels.device
        if not self.train:
            image = torch.arange(rank, n, world, device=device)
            return image, image, torch.zeros_like(image), torch.zeros_like(image)
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(n, generator=gen)
        top, left = torch.randint(0, 2 * self.pad + 1, (2, n), generator=gen)
        flip = torch.rand(n, generator=gen) < 0.5
        mine = torch.arange(rank, -(-n // world) * world, world) % n
        image = order[mine]
        return tuple(t.to(device) for t in (image, image + n * flip[mine], top[mine], left[mine]))

    def _images(self, row: torch.Tensor, top: torch.Tensor, left: torch.Tensor) -> torch.Tensor:
        x = self.windows[row, :, top, left]  # (B, 3, 32, 32) uint8
        return torch.addcmul(self.shift, x.float(), self.scale)

    def __iter__(self):
        image, row, top, left = self._plan(self.epoch, self.rank, self.world)
        for step in range(self.start_step, len(self)):
            batch = slice(step * self.batch_size, (step + 1) * self.batch_size)
            yield self._images(row[batch], top[batch], left[batch]), self.labels[image[batch]]

    def init_batch(self, n: int) -> tuple:
        """The first n images of epoch 0 as a single process draws them, and their labels: the same on every
        rank, and never a training step, since training starts at epoch 1."""
        image, row, top, left = self._plan(0, 0, 1)
        return self._images(row[:n], top[:n], left[:n]), self.labels[image[:n]]
