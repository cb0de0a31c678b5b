"""A run's identity: the recipe it trains, as it trains it.

cls.py's flags come in two groups, declared once, here (make_parser): the recipe, what a run trains, and
where and how it runs, which a resumed run may change. A Recipe is every recipe flag but --seed at the value
the run uses, and the number of processes:
    - caps applied: --warmup_epochs at most half of --epochs;
    - defaults resolved: --init_images to 512 or every training image where there are fewer, --residual_scale
      auto to 1/(blocks in the stage);
    - flags that do nothing cleared: --bf16 off the GPU, --sync_bn on one process or a norm without batch
      statistics, --init_images and --residual_scale for norms that have no such init, --lr_base_batch
      without --lr_scaling;
    - floats at full precision.
So two command lines that train the same thing give equal recipes, and any difference in what is trained
gives different ones. The seed picks a run within a recipe. The run's files, the resume check, sweep.py's
grid and report.py's rows all ask this module.

A recipe's folder is named for reading: data, backbone, norm and batch, then the flags that differ from
their defaults (cifar10_resnet18_wn_32_lr0.003). Its recipe.json, the full recipe, is the identity; the name
alone never is (utils/record.py finds a recipe's folder by its recipe.json).
"""
import argparse
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable, Union

from model import MODELS, NORMS
from utils import runtime
from utils.cli import (ArgumentParser, at_least, auto_or_natural_float, auto_or_positive_int, natural_float,
                       natural_int, non_empty, positive_float, positive_int, seed_int)
from utils.data import DATASETS, train_size

# --lr_scaling: the power of (global batch / --lr_base_batch) that multiplies --lr. linear: Goyal et al. 2017
# (SGD); sqrt: Malladi et al. 2022 (Adam-type), timm's default for them; none: one lr at every batch size.
LR_SCALING = {"none": 0.0, "linear": 1.0, "sqrt": 0.5}
INIT_IMAGES = 512  # --init_images when not given, or every training image where there are fewer


def make_parser(description: str = None) -> ArgumentParser:
    """Every flag of a run, with its default. bench.py and sweep.py add their own flags to this parser."""
    p = ArgumentParser(description=description)
    r = p.add_argument_group("the recipe", "what the run trains: these define it (recipe.py)")
    r.add_argument("--data_name", default="cifar10", choices=list(DATASETS),
                   help="synthetic: random images with CIFAR-10's shape, for benchmarks without a download")
    r.add_argument("--backbone_type", default="resnet18", choices=list(MODELS), help="the network")
    r.add_argument("--norm_type", default="bn", choices=list(NORMS), help="the normalization (README: Models)")
    r.add_argument("--batch_size", default=32, type=positive_int, help="images per step and per process")
    r.add_argument("--epochs", default=90, type=positive_int, help="sweeps over the training set")
    # the training recipe: docs/recipe.md
    r.add_argument("--optimizer", default="adamw", choices=["adamw", "adam"],
                   help="adamw: decoupled weight decay; adam: L2 added to the gradient, as the original")
    r.add_argument("--lr", default=1e-3, type=positive_float, nargs="+",
                   help="peak learning rate (at a global batch of --lr_base_batch, under --lr_scaling); several: "
                        "one a run, as --seed's")
    r.add_argument("--lr_scaling", default="none", choices=list(LR_SCALING),
                   help="scale --lr with the global batch (--batch_size x processes): linear, sqrt, or none")
    r.add_argument("--lr_base_batch", default=32, type=positive_int, help="the global batch at which --lr holds")
    r.add_argument("--weight_decay", default=0.05, type=natural_float, nargs="+",
                   help="on conv and linear weights only; never on gains, norm affines or biases; several: one a "
                        "run, as --seed's")
    r.add_argument("--lr_schedule", default="cosine", choices=["cosine", "step"],
                   help="per step after the warmup: cosine to 0, or x0.1 at 50%% and 75%% of the steps")
    r.add_argument("--warmup_epochs", default=1.0, type=natural_float,
                   help="linear warmup from lr/steps to lr; at most half of --epochs, and recorded as used")
    r.add_argument("--seed", default=0, type=seed_int, nargs="+",
                   help="seeds the weights, the data order and the augmentation; several: a run each, trained "
                        "together in one packed network where --pack lets them (docs/speed.md)")
    r.add_argument("--width", default=64, type=positive_int, help="channels of the stem, doubled every stage; "
                                                                   "the papers' 64, or less for quick tests")
    r.add_argument("--init_images", default=None, type=at_least(2),
                   help=f"wn, wn_mbn: training images in the data-dependent init's one batch, at least 2 "
                        f"(default: {INIT_IMAGES}, or every training image where there are fewer)")
    r.add_argument("--residual_scale", "--wn_residual_scale", dest="residual_scale", default="auto",
                   type=auto_or_natural_float,
                   help="wn, wn_mbn, sws: after the init, scale the last layer of every residual branch by this; "
                        "auto: 1/(blocks in its stage)")
    r.add_argument("--agc", default=0.0, type=natural_float,
                   help="adaptive gradient clipping: each output unit's gradient to at most this times its "
                        "weight, on every weight but the final linear's (docs/norms-family.md); 0: off")
    r.add_argument("--subset", default=0, type=natural_int,
                   help="train on a fixed random N training images and test on N test images (0: all)")
    r.add_argument("--val_images", default=0, type=natural_int,
                   help="hold out a fixed random N training images, the same for every seed and recipe and never "
                        "trained on, and evaluate them every epoch: the validation split on which report.py "
                        "picks the best epoch and --tune a value (0: none, the original's experiment)")
    r.add_argument("--bf16", default=True, action=argparse.BooleanOptionalAction, help="bf16 autocast on CUDA")
    r.add_argument("--sync_bn", action="store_true",
                   help="under torchrun, batch statistics over all ranks (bn's, and wn_mbn's mean)")
    h = p.add_argument_group("where and how it runs", "a resumed run may change these")
    h.add_argument("--data_path", default=None,
                   help="CIFAR: the folder holding cifar-10-batches-py/ or cifar-100-python/ (or that folder), "
                        "downloaded there if absent; ImageNet: the folder holding train/ and val/ (default: data "
                        "for CIFAR, /home/data/imagenet/ILSVRC2012 for ImageNet)")
    h.add_argument("--device", default=None, type=runtime.device_name,
                   help="cuda, cuda:1, cpu, ... (default: cuda if there is one)")
    h.add_argument("--workers", default=8, type=natural_int, help="DataLoader processes (ImageNet only)")
    h.add_argument("--results_dir", default="results", type=non_empty("a folder"),
                   help="where the runs' folders go: {results_dir}/{recipe}/seed{N}/")
    h.add_argument("--resume", action="store_true",
                   help="continue this run from its checkpoint; skip it if finished or diverged")
    h.add_argument("--keep_checkpoint", action="store_true", help="keep checkpoint.pth when the run finishes")
    h.add_argument("--layer_stats", default=True, action=argparse.BooleanOptionalAction,
                   help="write the run's layers.csv, per-layer statistics every epoch")
    h.add_argument("--tensorboard", default=True, action=argparse.BooleanOptionalAction,
                   help="write TensorBoard events into the run's folder (docs/tensorboard.md)")
    h.add_argument("--compile", default="auto", choices=["auto", "off", "default", "reduce-overhead"],
                   help="torch.compile mode; auto: reduce-overhead (CUDA graphs) on one CUDA device, else off")
    h.add_argument("--pack", default="auto", type=auto_or_positive_int,
                   help="runs given several --seed, --lr or --weight_decay values train at most this many at once, "
                        "packed into one network; 1: one after another; auto: 8 where one run's step is small "
                        "enough for packing to pay on this device, else 1 (docs/speed.md)")
    return p


def _dests(parser: argparse.ArgumentParser, title: str) -> list:
    (group,) = [g for g in parser._action_groups if g.title == title]
    return [a.dest for a in group._group_actions]


PARSER = make_parser()
RECIPE_FLAGS = _dests(PARSER, "the recipe")  # in the parser's order
RESUMABLE = _dests(PARSER, "where and how it runs")  # a resumed run may change these, never the recipe's
DEFAULTS = {flag: PARSER.get_default(flag) for flag in RECIPE_FLAGS}
FLOATS = [flag for flag, value in DEFAULTS.items() if isinstance(value, float)]
HEAD = ("data_name", "backbone_type", "norm_type", "batch_size")  # every recipe's name starts with these
# Flags whose values may differ between the runs of one pack: each run has its own tensors, optimizer and data.
PACKABLE = ("seed", "lr", "weight_decay")
IDENTITY = [flag for flag in RECIPE_FLAGS if flag != "seed"] + ["world_size"]  # a Recipe's keys
# Flags whose meaning depends on the norm, cleared for norms they do nothing for: runs of different norms that
# differ only in these are compared with each other (report.py's families).
PER_NORM = ("init_images", "residual_scale", "sync_bn")
# Flags renamed since runs were first recorded, {old: new}: what an older record calls today's flag.
RENAMED = {"wn_residual_scale": "residual_scale"}
# Flags added since runs were first recorded, {flag: the value that gives the behaviour before it existed}: an
# older recipe.json without the flag is the recipe with this value.
ADDED = {"val_images": 0}


@dataclass(frozen=True)
class Context:
    """What a recipe's values depend on besides its flags: the device type a run trains on, its processes,
    and its training images after --subset (an int, or a function that counts them, called only where a
    default needs it)."""
    device_type: str
    world: int
    train_images: Union[int, Callable[[], int]]

    @classmethod
    def of(cls, args: argparse.Namespace, device_type: str, world: int) -> "Context":
        """Where cls.py's flags are resolved: their training images are counted only if a default needs them."""
        return cls(device_type, world,
                   lambda: args.subset or train_size(args.data_name, args.data_path) - args.val_images)

    def count_train_images(self) -> int:
        return self.train_images if isinstance(self.train_images, int) else self.train_images()


def residual_scales(backbone_type: str, scale) -> Union[float, list]:
    """--residual_scale as used: auto is 1/(blocks in the stage) for each stage, one number where the stages
    agree (0.5 for ResNet-18), else a list of four; a number, or a list, stays as it is."""
    if isinstance(scale, list):
        return [float(s) for s in scale]
    if scale != "auto":
        return float(scale)
    if backbone_type not in MODELS:  # a backbone this version lacks: a fork's runs, read
        return scale
    scales = [1 / blocks for blocks in MODELS[backbone_type].layers]
    return scales[0] if len(set(scales)) == 1 else scales


def _spell(flag: str, value) -> str:
    if isinstance(value, bool):
        return flag if value else f"no_{flag}"
    if isinstance(value, list):
        return flag + "-".join(map(repr, value))
    return f"{flag}{value!r}" if isinstance(value, float) else f"{flag}{value}"


def split_runs(args: argparse.Namespace) -> list:
    """The runs that cls.py's flags name, one Namespace each: the i-th takes the i-th value of --seed, --lr and
    --weight_decay, or the only one given. ValueError where the counts differ or a run is given twice."""
    given = {flag: getattr(args, flag) if isinstance(getattr(args, flag), list) else [getattr(args, flag)]
             for flag in PACKABLE}
    count = max(len(values) for values in given.values())
    if any(len(values) not in (1, count) for values in given.values()):
        raise ValueError(f"arguments {', '.join(f'--{f}' for f in PACKABLE)}: each takes one value, or one a run, as "
                         f"many as the others; got {', '.join(map(str, map(len, given.values())))}")
    named = [argparse.Namespace(**{**vars(args), **{flag: values[i % len(values)] for flag, values in given.items()}})
             for i in range(count)]
    if len({tuple(vars(run)[f] for f in PACKABLE) for run in named}) < count:
        raise ValueError(f"arguments {', '.join(f'--{f}' for f in PACKABLE)}: a run given twice")
    return named


class Recipe(Mapping):
    """{flag: value as used} of every recipe flag but --seed, and world_size: what a run trains. Equal recipes
    train the same thing; read a value as recipe.lr or recipe["lr"]."""

    def __init__(self, values: dict):
        self._values = dict(values)
        self._json = json.dumps(self._values, sort_keys=True)

    @classmethod
    def resolve(cls, flags, context: Context) -> "Recipe":
        """The recipe of these flags (an argparse Namespace or a dict of every recipe flag; the seed is left
        out), as a run in `context` uses them."""
        given = {flag: (vars(flags) if isinstance(flags, argparse.Namespace) else flags)[flag]
                 for flag in IDENTITY if flag != "world_size"}
        norm = NORMS.get(given["norm_type"])  # None for a norm this version lacks: a fork's runs, read
        used = {**given, **{flag: float(given[flag]) for flag in FLOATS}}
        used["warmup_epochs"] = min(used["warmup_epochs"], given["epochs"] / 2)
        used["lr_base_batch"] = given["lr_base_batch"] if given["lr_scaling"] != "none" else None
        used["bf16"] = bool(given["bf16"]) and context.device_type == "cuda"
        if norm is not None:
            used["init_images"] = (given["init_images"] or min(INIT_IMAGES, context.count_train_images())
                                   if norm.data_init else None)
            used["residual_scale"] = (residual_scales(given["backbone_type"], given["residual_scale"])
                                      if norm.scales_residuals else None)
            used["sync_bn"] = bool(given["sync_bn"]) and context.world > 1 and norm.sync is not None
        used["world_size"] = context.world
        return cls(used)

    @classmethod
    def from_json(cls, saved: dict) -> "Recipe":
        """A recipe.json, today's flag names for renamed flags and the old behaviour for flags added since;
        ValueError if it is not a recipe."""
        if not isinstance(saved, dict):
            raise ValueError(f"a JSON {type(saved).__name__}, not a recipe")
        values = {**ADDED, **{RENAMED.get(k, k): v for k, v in saved.items()}}
        missing, unknown = set(IDENTITY) - set(values), set(values) - set(IDENTITY)
        if missing or unknown:
            raise ValueError(", ".join([*(f"no {flag}" for flag in sorted(missing)),
                                        *(f"an unknown {flag}" for flag in sorted(unknown))]))
        return cls({flag: values[flag] for flag in IDENTITY})

    def to_json(self) -> dict:
        return dict(self._values)

    def __getitem__(self, flag):
        return self._values[flag]

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __getattr__(self, flag):
        if flag.startswith("_"):
            raise AttributeError(flag)
        try:
            return self._values[flag]
        except KeyError:
            raise AttributeError(flag) from None

    def __eq__(self, other) -> bool:
        return isinstance(other, Recipe) and self._json == other._json

    def __hash__(self) -> int:
        return hash(self._json)

    def __repr__(self) -> str:
        return f"Recipe({self._json})"

    def unused(self, flags: argparse.Namespace) -> list:
        """The per-norm flags given a value of their own that this recipe clears: they do nothing here."""
        return [flag for flag in PER_NORM if getattr(flags, flag) != DEFAULTS[flag] and self[flag] in (None, False)]

    def key(self, leave_out=()) -> str:
        """Every value but those in leave_out, as one string: recipes with the same key differ only there."""
        return json.dumps({k: v for k, v in self._values.items() if k not in leave_out}, sort_keys=True)

    def peak_lr(self) -> float:
        """--lr x (global batch / --lr_base_batch) ** LR_SCALING[--lr_scaling], the global batch being
        --batch_size x processes: the lr the schedule warms up to."""
        power = LR_SCALING[self.lr_scaling]
        return self.lr * (self.batch_size * self.world_size / (self.lr_base_batch or 1)) ** power

    def differs(self, context: Context) -> dict:
        """{flag: value} of the values that differ from what the flag's default gives with the others as they
        are, in the parser's order, and world_size where it is not 1. The head (data, backbone, norm, batch)
        is left out: every name has it."""
        out = {}
        for flag in IDENTITY:
            if flag in HEAD:
                continue
            default = 1 if flag == "world_size" else \
                Recipe.resolve({**self._values, flag: DEFAULTS[flag]}, Context(context.device_type,
                               self.world_size, context.train_images))[flag]
            if self._values[flag] != default:
                out[flag] = self._values[flag]
        return out

    def name(self, context: Context) -> str:
        """The folder name: the head, then the values that differ from their defaults, or a hash of them where
        they would make a name too long to read."""
        head = "_".join(str(self._values[flag]) for flag in HEAD)
        parts = [_spell(flag, value) for flag, value in self.differs(context).items()]
        name = "_".join([head, *parts])
        return name if len(name) <= 120 else f"{head}_{self.digest()}"

    def digest(self) -> str:
        """8 hex digits of the whole recipe."""
        return hashlib.sha1(self._json.encode()).hexdigest()[:8]

    def spelled_against(self, other: "Recipe") -> str:
        """What this recipe's name adds where another recipe holds its folder name: the values that differ
        from the other's."""
        return "_".join(_spell(flag, value) for flag, value in self._values.items() if other.get(flag) != value)
