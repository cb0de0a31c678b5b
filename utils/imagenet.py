"""ImageNet: class folders read by DataLoader workers, sharded over the ranks, resumable mid-epoch."""
import hashlib
import itertools
import json
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler, Subset

from utils.cli import UserError
from utils.data import DATASETS, EVAL_BATCH_SIZE, Data, check_sizes, fixed_sample, split_indices



class UnreadableImage(UserError):
    """An image file that PIL cannot read. A DataLoader worker's exception comes back to the main process
    as exc_type(the worker's formatted traceback) (torch/_utils.py, ExceptionWrapper.reraise), so only its
    last line, the message read_image wrote, is kept."""

    def __init__(self, message: str):
        super().__init__(message.strip().splitlines()[-1].split(f"{type(self).__name__}: ", 1)[-1])


def read_image(path: str) -> Image.Image:
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except Exception as e:  # OSError, PIL's UnidentifiedImageError and DecompressionBombError alike
        raise UnreadableImage(f"cannot read image {path} ({type(e).__name__}); delete or replace it") from None


def imagenet_data(args, ctx) -> Data:
    """ImageFolder train/ and val/ under --data_path, cut to --subset, sharded over the ranks, read by
    DataLoader workers. The head gets one class per folder of train/, and val/ must have the same folders.
    ImageNet's val/ is the test split here; --val_images holds its images out of train/."""
    from torchvision import datasets, transforms  # see load_cifar
    root = Path(args.data_path)
    normalize = transforms.Normalize(*DATASETS["imagenet"].mean_std)
    train_tf = transforms.Compose([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), normalize])
    eval_tf = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(), normalize])
    train_set, val_set = imagenet_folders(root, datasets, train_tf, eval_tf)
    if train_set.classes != val_set.classes:
        only = {s: sorted(set(a.classes) - set(b.classes)) for s, a, b in
                (("train/", train_set, val_set), ("val/", val_set, train_set))}
        raise UserError(f"{root}: train/ and val/ have different class folders (only in train/: "
                        f"{only['train/'][:5] or 'none'}; only in val/: {only['val/'][:5] or 'none'}); "
                        f"give both the same classes")
    check_sizes(args, len(train_set), ctx.world)
    num_classes, (held_out, train) = len(train_set.classes), split_indices(len(train_set), args.val_images, args.subset)
    # The files' names and classes, not their bytes: reading 1.3M images to hash them would take as long as an epoch.
    listing = [(str(Path(path).relative_to(root)), target) for s in (train_set, val_set) for path, target in s.samples]
    listing += [held_out.tolist()] if args.val_images else []
    fingerprint = hashlib.sha1(json.dumps(listing).encode()).hexdigest()[:16]
    if args.val_images:  # train/'s images, seen as evaluation sees them
        held_out = Subset(datasets.ImageFolder(str(root / "train"), eval_tf, loader=read_image), held_out.tolist())
    if train is not None:
        train_set = Subset(train_set, train.tolist())
    if args.subset:
        val_set = Subset(val_set, fixed_sample(len(val_set), min(args.subset, len(val_set))).tolist())
    kwargs = dict(num_workers=args.workers, pin_memory=ctx.device.type == "cuda", persistent_workers=args.workers > 0)
    sampler = ResumableSampler(train_set, num_replicas=ctx.world, rank=ctx.rank, shuffle=True, seed=args.seed)

    def shard(dataset):  # no padding: every image counted once
        return EpochLoader(Subset(dataset, range(ctx.rank, len(dataset), ctx.world)), EVAL_BATCH_SIZE, **kwargs)
    return Data(EpochLoader(train_set, args.batch_size, sampler=sampler, **kwargs), shard(val_set),
                shard(held_out) if args.val_images else None, num_classes, len(train_set), fingerprint)


def imagenet_folders(root: Path, datasets, train_tf=None, eval_tf=None) -> tuple:
    """(train, val) ImageFolders under root (datasets: torchvision.datasets), or one line saying what is wrong."""
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise UserError(f"{root / split} is not a folder; --data_path must hold ImageNet's train/ and val/ "
                            f"as ImageFolder class folders")
    try:
        return (datasets.ImageFolder(str(root / "train"), train_tf, loader=read_image),
                datasets.ImageFolder(str(root / "val"), eval_tf, loader=read_image))
    except (FileNotFoundError, OSError) as e:  # ImageFolder raises these for a folder with no class images
        raise UserError(f"cannot read ImageNet under {root}: {e}") from None


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start an epoch part-way, for a run resumed mid-epoch."""
    start_index = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start_index, None)

    def __len__(self) -> int:  # 0 for a run stopped after an epoch's last batch
        return max(0, self.num_samples - self.start_index)


class EpochLoader(DataLoader):
    """A DataLoader with CifarLoader's set_epoch, num_images, init_batch and reseeded, so the loop treats both
    alike."""

    def __init__(self, dataset, batch_size: int, **kwargs):
        super().__init__(dataset, batch_size, **kwargs)
        self.kwargs = kwargs

    def reseeded(self, seed: int) -> "EpochLoader":
        """The same images in another seed's order: another loader, with a sampler of its own."""
        if not isinstance(self.sampler, ResumableSampler):
            return self
        sampler = ResumableSampler(self.dataset, num_replicas=self.sampler.num_replicas, rank=self.sampler.rank,
                                   shuffle=True, seed=seed)
        return EpochLoader(self.dataset, self.batch_size, **{**self.kwargs, "sampler": sampler})

    @property
    def num_images(self) -> int:
        return getattr(self.sampler, "num_samples", len(self.dataset))

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        if isinstance(self.sampler, ResumableSampler):
            self.sampler.set_epoch(epoch)
            self.sampler.start_index = start_step * self.batch_size

    def init_batch(self, n: int) -> tuple:
        """As CifarLoader.init_batch: the first n images of epoch 0 in a single process's order."""
        order = DistributedSampler(self.dataset, num_replicas=1, rank=0, shuffle=True, seed=self.sampler.seed)
        images, labels = zip(*(self.dataset[i] for i in itertools.islice(order, n)))
        return torch.stack(images), torch.tensor(labels)
