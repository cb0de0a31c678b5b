"""Train and evaluate a ResNet or ResNeXt classifier with bn, in, wn, wn_mbn, gn, ws_gn or sws as its normalization.

Examples:
    python cls.py                                          # ResNet-18, bn, CIFAR-10, batch 32, 90 epochs
    python cls.py --norm_type wn                           # weight normalization, the same recipe
    python cls.py --norm_type sws --agc 0.01               # NF-ResNet's conv and adaptive gradient clipping
    python cls.py --data_name cifar100 --batch_size 2
    python cls.py --backbone_type resnext50 --norm_type wn_mbn --epochs 30
    python cls.py --optimizer adam --lr_schedule step --weight_decay 5e-4 --warmup_epochs 0   # the original's recipe
    python cls.py --batch_size 256 --lr_scaling sqrt         # peak lr 1e-3 x sqrt(256 / 32) (docs/statistics.md)
    python cls.py --data_name imagenet --data_path /home/data/imagenet/ILSVRC2012 --workers 16
    torchrun --nproc_per_node 8 cls.py --data_name imagenet --batch_size 32    # 32 per GPU, 256 in all
    python cls.py --norm_type wn --resume                  # continue (or skip, if done) a stopped run

Each run is named by its recipe: cifar10_resnet18_wn_32 for the defaults, cifar10_resnet18_wn_32_seed1 for
another seed (docs/reliability.md). It writes, under --results_dir, {name}_ followed by statistics.csv (one row
per epoch), layers.csv (per-layer statistics, one row per layer and epoch), args.json (how it was made, and its
status), checkpoint.pth (after every epoch and on SIGINT/SIGTERM/SIGUSR2; dropped when the run finishes) and
model.pth (the final weights), keeps its row in summary.csv up to date, and writes its TensorBoard events to
tensorboard/{name}/ there (docs/tensorboard.md).
"""
from utils.cli import exit_on_ctrl_c

if __name__ == "__main__":
    exit_on_ctrl_c("cls.py")  # before the imports below, which take seconds (flake8: E402 is meant)

import argparse
import math
import shlex
import signal
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import MODELS, NORMS, blocks, build_model, count_params_flops, min_width, weight_layers
from utils import runtime
from utils.agc import AGC_OFF, AdaptiveGradClip
from utils.board import Board, board_folder
from utils.cli import (ArgumentParser, RunDiverged, UserError, at_least, auto_or_natural_float, flag_error,
                       natural_float, natural_int, positive_float, positive_int, run_cli, seed_int)
from utils.data import DATASETS, build_loaders, resolve_path
from utils.layerstats import LayerStats
from utils.metrics import human, topk_correct
from utils.progress import EpochProgress, Progress
from utils.runfiles import DONE, EpochRow, RunRecord, provenance, run_name


# -----------------------------------------------------------------------------
# config: every flag of a run, with its default

# --lr_scaling: the power of (global batch / --lr_base_batch) that multiplies --lr. linear: Goyal et al. 2017
# (SGD); sqrt: Malladi et al. 2022 (Adam-type), timm's default for them; none: one lr at every batch size.
LR_SCALING = {"none": 0.0, "linear": 1.0, "sqrt": 0.5}


def make_parser() -> ArgumentParser:
    """bench.py and sweep.py add their own flags to this parser."""
    p = ArgumentParser(description=__doc__)
    p.add_argument("--data_name", default="cifar10", choices=list(DATASETS),
                   help="synthetic: random images with CIFAR-10's shape, for benchmarks without a download")
    p.add_argument("--data_path", default=None,
                   help="CIFAR: the folder holding cifar-10-batches-py/ or cifar-100-python/ (or that folder), "
                        "downloaded there if absent; ImageNet: the folder holding train/ and val/ (default: data "
                        "for CIFAR, /home/data/imagenet/ILSVRC2012 for ImageNet)")
    p.add_argument("--backbone_type", default="resnet18", choices=list(MODELS), help="the network")
    p.add_argument("--norm_type", default="bn", choices=list(NORMS), help="the normalization (README: Models)")
    p.add_argument("--batch_size", default=32, type=positive_int, help="images per step and per process")
    p.add_argument("--epochs", default=90, type=positive_int, help="sweeps over the training set")
    # the recipe: README "Training recipe"
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "adam"],
                   help="adamw: decoupled weight decay; adam: L2 added to the gradient, as the original")
    p.add_argument("--lr", default=1e-3, type=positive_float,
                   help="peak learning rate (at a global batch of --lr_base_batch, under --lr_scaling)")
    p.add_argument("--lr_scaling", default="none", choices=list(LR_SCALING),
                   help="scale --lr with the global batch (--batch_size x processes): linear, sqrt, or none")
    p.add_argument("--lr_base_batch", default=32, type=positive_int, help="the global batch at which --lr holds")
    p.add_argument("--weight_decay", default=0.05, type=natural_float,
                   help="on conv and linear weights only; never on gains, norm affines or biases")
    p.add_argument("--lr_schedule", default="cosine", choices=["cosine", "step"],
                   help="per step after the warmup: cosine to 0, or x0.1 at 50%% and 75%% of the steps")
    p.add_argument("--warmup_epochs", default=1.0, type=natural_float,
                   help="linear warmup from lr/steps to lr; at most half of --epochs, and recorded as used")
    p.add_argument("--seed", default=0, type=seed_int, help="seeds the weights, the data order and the augmentation")
    p.add_argument("--width", default=64, type=positive_int, help="channels of the stem, doubled every stage; "
                                                                   "the papers' 64, or less for quick tests")
    p.add_argument("--init_images", default=None, type=at_least(2),
                   help="wn, wn_mbn: training images in the data-dependent init's one batch, at least 2 "
                        "(default: 512, or every training image where there are fewer; recorded as used)")
    p.add_argument("--residual_scale", "--wn_residual_scale", dest="residual_scale", default="auto",
                   type=auto_or_natural_float,
                   help="wn, wn_mbn, sws: after the init, scale the last layer of every residual branch by this; "
                        "auto: 1/(blocks in its stage)")
    p.add_argument("--agc", default=0.0, type=natural_float,
                   help="adaptive gradient clipping: each output unit's gradient to at most this times its "
                        "weight, on every weight but the final linear's (docs/norms-family.md); 0: off")
    p.add_argument("--subset", default=0, type=natural_int,
                   help="train on a fixed random N training images and test on N test images (0: all)")
    # where and how it runs; a resumed run may change these
    p.add_argument("--device", default=None, type=runtime.device_name,
                   help="cuda, cuda:1, cpu, ... (default: cuda if there is one)")
    p.add_argument("--workers", default=8, type=natural_int, help="DataLoader processes (ImageNet only)")
    p.add_argument("--results_dir", default="results", help="where the run's files and summary.csv go")
    p.add_argument("--resume", action="store_true",
                   help="continue this configuration from its checkpoint; skip it if finished or diverged")
    p.add_argument("--keep_checkpoint", action="store_true", help="keep checkpoint.pth when the run finishes")
    p.add_argument("--layer_stats", default=True, action=argparse.BooleanOptionalAction,
                   help="write {run}_layers.csv, per-layer statistics every epoch")
    p.add_argument("--tensorboard", default=True, action=argparse.BooleanOptionalAction,
                   help="write TensorBoard events to {results_dir}/tensorboard/{run}/ (docs/tensorboard.md)")
    p.add_argument("--bf16", default=True, action=argparse.BooleanOptionalAction, help="bf16 autocast on CUDA")
    p.add_argument("--compile", default="auto", choices=["auto", "off", "default", "reduce-overhead"],
                   help="torch.compile mode; auto: reduce-overhead (CUDA graphs) on one CUDA device, else off")
    p.add_argument("--sync_bn", action="store_true", help="under torchrun, BatchNorm statistics over all ranks")
    return p


# Flags renamed since runs were first recorded, {old dest: new dest}: what an older args.json calls today's.
RENAMED_FLAGS = {"wn_residual_scale": "residual_scale"}


def parse_args(argv=None, parser=None) -> argparse.Namespace:
    """The flags, and args.name, the run's name, from the flags as given; then the adjustments, recorded as used."""
    parser = parser or make_parser()
    args = parser.parse_args(argv)
    if args.width < min_width(args.backbone_type, args.norm_type):
        parser.error(f"argument --width: must be at least {min_width(args.backbone_type, args.norm_type)} for "
                     f"--backbone_type {args.backbone_type} with --norm_type {args.norm_type}, got {args.width}")
    args.name = run_name({k: getattr(args, k) for k in DEFAULTS}, DEFAULTS)
    args.data_path = resolve_path(args.data_name, args.data_path)
    args.warmup_epochs = min(args.warmup_epochs, args.epochs / 2)
    return args


# Flags a resumed run may change: where and how it runs, never what it trains. Every other flag defines the
# run: it names the run's files, and a resume must match it, or one CSV would mix two recipes.
RESUMABLE_CHANGES = {"resume", "device", "workers", "data_path", "results_dir", "compile", "keep_checkpoint",
                     "layer_stats", "tensorboard"}


def defining_flags(parser: argparse.ArgumentParser) -> list:
    """The flags that define a run, in the parser's order: all of them but RESUMABLE_CHANGES."""
    return [a.dest for a in parser._actions if a.dest not in RESUMABLE_CHANGES and a.dest != "help"]


DEFINING_FLAGS = defining_flags(make_parser())
DEFAULTS = {flag: value for flag, value in vars(make_parser().parse_args([])).items() if flag in DEFINING_FLAGS}
INIT_IMAGES = 512  # --init_images when not given, or every training image where there are fewer
PROBE_IMAGES = 128  # the layer statistics' fixed batch
CHECK_IMAGES = 8  # the init's output is checked finite on these, in eval mode: no batch statistics
SYNC_EVERY = 25  # steps between the host syncs that look for NaN and signals, at most; 10 per epoch at least


# -----------------------------------------------------------------------------
# one train step, one epoch, one evaluation

def train_step(model, optimizer, scheduler, x, y, autocast, agc=AGC_OFF) -> tuple:
    """One step on a batch: (the mean loss, correct top-1), both left on the device."""
    with autocast:
        logits = model(x)
        loss = F.cross_entropy(logits, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    agc.clip()
    optimizer.step()
    scheduler.step()
    return loss.detach(), topk_correct(logits.detach(), y, ks=(1,))[0]


def train_one_epoch(run: "Run", loader, progress: Progress, ctx: runtime.Context, stop: runtime.StopSignal,
                    epochs: int, board: Board) -> None:
    """Train from progress.step to the end of the epoch. Raises Interrupted at the first safe point after a
    signal, Diverged on a NaN or infinite loss; under DDP all ranks agree on both, through the all-reduce
    of Progress.totals every few steps."""
    def images_done() -> int:  # in this epoch, all ranks together
        return ctx.world * min(progress.step * loader.batch_size, loader.num_images)

    run.train_model.train()
    every = max(1, min(SYNC_EVERY, len(loader) // 10))
    shown = EpochProgress(progress.epoch, epochs, ctx.world * loader.num_images, images_done(), ctx.is_main)
    try:
        for x, y in loader:
            loss, correct = train_step(run.train_model, run.optimizer, run.scheduler, *ctx.to_device(x, y),
                                       ctx.autocast, run.agc)
            progress.loss += loss.float() * len(y)
            progress.correct += correct
            progress.images += len(y)
            progress.step += 1
            if progress.step % every == 0 or (ctx.world == 1 and stop.signum):
                totals = progress.totals(ctx, stop.signum)
                board.step(progress, totals, run.optimizer.param_groups[0]["lr"])  # the stopping step's too
                if totals.stopping:
                    raise runtime.Interrupted()
                shown.update(images_done(), totals.loss, totals.top1)
    finally:
        shown.close()


@torch.no_grad()
def evaluate(model, loader, ctx: runtime.Context) -> dict:
    model.eval()
    sums = torch.zeros(4, device=ctx.device)  # sum of losses, correct top-1, correct top-5, images
    for x, y in loader:
        x, y = ctx.to_device(x, y)
        with ctx.autocast:
            logits = model(x)
        sums[0] += F.cross_entropy(logits.float(), y, reduction="sum")
        sums[1:3] += topk_correct(logits, y)
        sums[3] += len(y)
    loss_sum, top1, top5, n = ctx.all_sum(sums).tolist()
    return {"loss": loss_sum / n, "top1": 100 * top1 / n, "top5": 100 * top5 / n}


# -----------------------------------------------------------------------------
# model, optimizer, schedule

def peak_lr(args, world: int) -> float:
    """--lr x (global batch / --lr_base_batch) ** LR_SCALING[--lr_scaling], the global batch being
    --batch_size x processes: the lr the schedule warms up to."""
    return args.lr * (args.batch_size * world / args.lr_base_batch) ** LR_SCALING[args.lr_scaling]


def make_optimizer(model: nn.Module, args, lr: float, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (decoupled decay, Loshchilov & Hutter 2019) or Adam (L2 added to the gradient, the original's),
    with parameters grouped by role as timm's param_groups_weight_decay: the decay acts on conv and linear
    weights (WN's v and WS's raw weight among them), never on gains (WN's g, scaled WS's gain, norm affines)
    or biases, as DeepMind's NFNet optimizer. Under Adam's coupled L2, the weight of a layer with its own gain
    (WN's v, scaled WS's weight) is left undecayed too: w depends on v / ||v|| only, so L2
    changes nothing the loss sees, and Adam scales it to a step of about lr per element, which collapses
    ||v|| where the loss gives v no gradient (g = 0) and makes the gradient through g v / ||v|| explode
    once g moves: WN went NaN this way on an H100 (docs/recipe.md)."""
    decayed = {id(layer.direction) for layer in weight_layers(model).values()
               if args.optimizer == "adamw" or layer.gain is None}
    params = list(model.parameters())
    groups = [{"params": [p for p in params if id(p) in decayed], "weight_decay": args.weight_decay},
              {"params": [p for p in params if id(p) not in decayed], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.Adam
    return optimizer(groups, lr=lr, fused=device.type == "cuda")


def make_agc(model: nn.Module, args) -> AdaptiveGradClip:
    """AGC (--agc) on every conv's weight tensor, WN's v and WS's raw weight among them, by role as the
    optimizer's groups: not on gains, biases or norm affines, and never on the final linear, which Brock et
    al. 2021b (section 4.1) found better left unclipped."""
    layers = weight_layers(model).values()
    return AdaptiveGradClip([layer.direction for layer in layers if layer.module is not model.fc], args.agc)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """The learning rate of step `step` (0-based, of `total`) as a fraction of the peak (peak_lr): a linear
    warmup to 1 over the first `warmup` steps, then a cosine to 0 at the end of the run, or x0.1 at 50% and at
    75% of it."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "step":
        return 0.1 ** sum(step >= int(total * f) for f in (0.5, 0.75))
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def make_scheduler(optimizer, args, steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    # One pure function of the step inside torch's LambdaLR: exact at any step, so a resumed run replays it,
    # where chaining LinearLR and CosineAnnealingLR in SequentialLR computes the cosine recursively.
    total, warmup = args.epochs * steps_per_epoch, round(args.warmup_epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, warmup, args.lr_schedule))


def compile_mode(args, device: torch.device, world: int = 1) -> str:
    # On CUDA an eager step is bound by the host launching kernels (~12 ms at batch 32 and at 128 on an H100),
    # which CUDA graphs remove; the last, smaller batch of an epoch records a second graph once.
    # Under DDP, graphs have crashed (pytorch/pytorch#128218), so there they wait for an explicit
    # --compile reduce-overhead. On the CPU compiling costs minutes and gains little.
    if args.compile != "auto":
        return args.compile
    return "reduce-overhead" if device.type == "cuda" and world == 1 else "off"


@dataclass
class Run:
    """What a run trains. train_model is model as the train step calls it, wrapped for DDP and compiled where
    asked; evaluation, the layer statistics and the checkpoints use model itself."""
    model: nn.Module
    train_model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    layer_stats: LayerStats
    agc: AdaptiveGradClip
    params: int
    flops: int
    init_images: Optional[int]  # the data-dependent init's batch, as used (None for norms without one)

    def state(self, progress: Progress, ctx: runtime.Context) -> dict:
        """Everything a resume needs besides the record's history: collective under DDP."""
        return {**{name: getattr(self, name).state_dict() for name in ("model", "optimizer", "scheduler",
                                                                       "layer_stats")},
                "progress": progress.state_dict(ctx), "rng": runtime.rng_states()}

    def load(self, state: dict, ctx: runtime.Context, source) -> Progress:
        """The run and the RNGs as a checkpoint's state (read from `source`) left them; returns where training
        stood. A state that does not fit, as another norm's network, is refused in one line, not torch's list
        of every layer name."""
        part = "state"
        try:
            for part in ("model", "optimizer", "scheduler", "layer_stats"):
                getattr(self, part).load_state_dict(state[part])
            part = "rng"
            runtime.set_rng_states(state["rng"])
            part = "progress"
            progress = Progress.from_state(state["progress"], ctx)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise UserError(f"{source} does not fit this run: its {part} does not load ({type(e).__name__}), as "
                            f"with another norm's or backbone's checkpoint; move it away to start over") from None
        ctx.log(f"resuming at epoch {progress.epoch}, step {progress.step}")
        return progress


def initialize(norm, model: nn.Module, args, data, ctx: runtime.Context) -> Optional[int]:
    """The norm's own init: WN's data-dependent one on one batch of training images, sws's residual scaling on
    none. Returns the number of images it used; None where it asked for none."""
    used = []

    def images() -> torch.Tensor:
        n = args.init_images or min(INIT_IMAGES, data.train_images)
        if n > data.train_images:
            raise flag_error("--init_images", f"must be at most {data.train_images}, the training images, got {n}")
        used.append(n)
        return data.train.init_batch(n)[0].to(ctx.device)

    try:
        norm.init(model, images, args.residual_scale)
    except ValueError as e:  # a channel with no spread on this batch: g = 1/std would be infinite
        raise flag_error("--init_images", f"{e} on the init batch of {used[0]} images; use more images") from None
    except RuntimeError as e:  # torch.OutOfMemoryError on CUDA; a plain RuntimeError from the CPU's allocator
        if not (isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in str(e)):
            raise
        raise flag_error("--init_images", f"{used[0] if used else 'the'} init images do not fit in the memory of "
                                          f"{ctx.device} in one batch; use fewer") from None
    check_finite_at_init(model, data.train.init_batch(min(CHECK_IMAGES, data.train_images))[0].to(ctx.device), args)
    return used[0] if used else None


@torch.no_grad()
def check_finite_at_init(model: nn.Module, x: torch.Tensor, args) -> None:
    """Refuses an init that leaves the network's output non-finite before any step, which training would
    record as a run that diverged: e.g. --residual_scale 1e308 multiplies every residual branch by 1e308,
    inf in float32. In eval mode, so that no running statistic moves and a few images are enough."""
    training = model.training
    model.eval()
    worst = model(x).float().abs().max().item()
    model.train(training)
    if not math.isfinite(worst):
        raise flag_error("--residual_scale", f"{args.residual_scale} leaves the network's output {worst} after the "
                                             f"init, before any step; use a smaller scale (auto: 1/(blocks in the "
                                             f"stage))")


def build(args, ctx: runtime.Context, data) -> Run:
    norm = NORMS[args.norm_type]
    model = build_model(args.backbone_type, args.norm_type, data.num_classes,
                        cifar_stem=DATASETS[args.data_name].image_size == 32, width=args.width)
    params, flops = count_params_flops(model, DATASETS[args.data_name].image_size)
    model.to(ctx.device)
    # before DDP wraps the model, whose constructor hands every rank rank 0's values
    init_images = initialize(norm, model, args, data, ctx) if norm.init else None
    if args.sync_bn and ctx.world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(ctx.device, memory_format=ctx.memory_format)
    train_model = model
    if ctx.world > 1:
        device_ids = None if ctx.device.type == "cpu" else [ctx.device.index]
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    mode = compile_mode(args, ctx.device, ctx.world)
    if mode != "off":
        train_model = torch.compile(train_model, mode=mode)
    optimizer = make_optimizer(model, args, peak_lr(args, ctx.world), ctx.device)
    probe = ctx.to_device(*data.train.init_batch(PROBE_IMAGES)) if args.layer_stats else None
    stats = LayerStats(model, weight_layers(model), blocks(model), probe, ctx.autocast)
    return Run(model, train_model, optimizer, make_scheduler(optimizer, args, len(data.train)), stats,
               make_agc(model, args), params, flops, init_images)


# -----------------------------------------------------------------------------
# the loop

def run_epoch(run: Run, data, record: RunRecord, board: Board, progress: Progress, ctx: runtime.Context,
              stop: runtime.StopSignal, args) -> Progress:
    """Finish the epoch under way, evaluate it, and record it; returns the progress of the next epoch."""
    epoch = progress.epoch
    data.train.set_epoch(epoch, progress.step)
    start = time.time()
    try:
        train_one_epoch(run, data.train, progress, ctx, stop, args.epochs, board)
    finally:
        progress.seconds += time.time() - start
    train = progress.totals(ctx)
    start = time.time()
    test = evaluate(run.model, data.test, ctx)
    if not math.isfinite(test["loss"]):  # NaN logits still give a top-1: a number that is no result
        raise runtime.Diverged(f"the test loss became {test['loss']} in epoch {epoch}")
    row = EpochRow(epoch, progress.lr, train.loss, train.top1, test["loss"], test["top1"], test["top5"],
                   progress.seconds + time.time() - start)
    layer_rows, following = run.layer_stats.rows(epoch), Progress.start(epoch + 1, run.optimizer, ctx.device)
    if epoch < args.epochs:
        record.end_epoch(row, layer_rows, run.state(following, ctx))
    else:
        record.finish(row, layer_rows, run.model.state_dict(), run.state(following, ctx))
    board.epoch(row, layer_rows)
    ctx.log(f"epoch {epoch}/{args.epochs}: train loss {train.loss:.4f} top-1 {train.top1:.2f}% | test loss "
            f"{test['loss']:.4f} top-1 {test['top1']:.2f}% top-5 {test['top5']:.2f}% | {row.seconds:.1f} s")
    return following


def head(args, ctx: runtime.Context, data=None, run: Run = None) -> dict:
    """The run's args.json: every flag as used, where and how it ran, and what it trained on; the parts that
    need the data and the model are left out (None) before they exist."""
    return {"name": args.name, **{k: v for k, v in vars(args).items() if k != "name"},
            "device": str(ctx.device), "compile": compile_mode(args, ctx.device, ctx.world), "world_size": ctx.world,
            "peak_lr": peak_lr(args, ctx.world),
            "init_images_used": run.init_images if run else None,
            "data_fingerprint": data.fingerprint if data else None, "train_images": data.train_images if data else None,
            "params": run.params if run else None, "flops": run.flops if run else None, **provenance(ctx.device_name)}


def train_epochs(run: Run, data, record: RunRecord, board: Board, progress: Progress, ctx: runtime.Context,
                 args) -> None:
    """Every epoch left; a divergence or a signal is recorded as such and ends the run with one line."""
    with runtime.StopSignal() as stop:
        try:
            while progress.epoch <= args.epochs:
                progress = run_epoch(run, data, record, board, progress, ctx, stop, args)
        except runtime.Diverged as e:
            record.diverge(str(e))
            raise RunDiverged(f"{args.name} diverged: {e}. Its {len(record.epochs)} finished epochs are in "
                              f"{record.statistics}, and it is recorded as diverged") from None
        except runtime.Interrupted:
            record.interrupt(run.state(progress, ctx))
            command = shlex.join(["python", *sys.argv] + ([] if args.resume else ["--resume"]))
            raise UserError(f"stopped by {signal.Signals(stop.signum).name} in epoch {progress.epoch} after step "
                            f"{progress.step}; {record.checkpoint} is saved. Continue with: {command}",
                            exit_code=128 + stop.signum) from None


def train(args, ctx: runtime.Context, record: RunRecord) -> None:
    """A run that is not a result yet: its data and model, where it stands, and its epochs."""
    data = build_loaders(args, ctx)
    run = build(args, ctx, data)
    recipe = head(args, ctx, data, run)
    progress = record.start(recipe, args.resume, ctx.device,
                            restore=lambda state: run.load(state, ctx, record.checkpoint))
    progress = progress or Progress.start(1, run.optimizer, ctx.device)
    if args.device is None and ctx.device.type == "cpu":  # here, not first: an error before it is one line alone
        ctx.log("notice: no CUDA device found, training on the CPU")
    ctx.log(f"{args.name}: {run.params / 1e6:.2f}M params, {human(run.flops)} FLOPs, {ctx.world} x {ctx.device_name}")
    events = board_folder(args.results_dir, args.name)
    if args.tensorboard:
        ctx.log(f"curves as it trains: tensorboard --logdir {args.results_dir} (events in {events})")
    with Board(events, args.tensorboard and ctx.is_main, len(data.train), progress, weight_layers(run.model),
               recipe) as board:
        train_epochs(run, data, record, board, progress, ctx, args)
    written = [record.statistics] + ([record.layers_csv] if record.layers else [])
    ctx.log(f"{args.name} finished: results in {', '.join(map(str, written))} and {record.summary}; weights in "
            f"{record.weights}")


def main(args: argparse.Namespace) -> None:
    """One run: trained from the start, resumed from its checkpoint, or left alone if it is a result already."""
    ctx = runtime.setup(args)
    with RunRecord(args.results_dir, args.name, DEFAULTS, ctx.is_main, args.keep_checkpoint, RENAMED_FLAGS) as record:
        status = record.status()
        if status and not args.resume:
            raise UserError(f"{args.name} already has results in {args.results_dir}; pass --resume to continue "
                            f"it (or skip it if it is done), or choose another --results_dir")
        if status in DONE:
            record.check(head(args, ctx))
            record.restore_summary()
            return ctx.log(f"{args.name} is already {status} in {args.results_dir}; nothing to do")
        train(args, ctx, record)


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()), "cls.py")
