"""Train and evaluate a ResNet or ResNeXt classifier with batch, instance or weight normalization.

Examples:
    python cls.py                                          # ResNet-18, bn, CIFAR-10, batch 32, 90 epochs
    python cls.py --data_name cifar100 --batch_size 2
    python cls.py --backbone_type resnext50 --norm_type wn --epochs 30
    python cls.py --data_name imagenet --data_path /home/data/imagenet/ILSVRC2012 --workers 16
    torchrun --nproc_per_node 8 cls.py --data_name imagenet --batch_size 32    # 32 per GPU, 256 in all
    python cls.py --norm_type wn --resume                  # continue (or skip, if done) a stopped run

Each run writes, under --results_dir, {data_name}_{backbone_type}_{norm_type}_{batch_size}_ followed by
statistics.csv (one row per epoch), args.json, checkpoint.pth (after every epoch, and on SIGINT/SIGTERM)
and model.pth (the final weights), and keeps its row in summary.csv up to date.
"""
import argparse
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import utils
from model import MODELS, NORMS, build_model, data_dependent_init, scale_residual_branches, wn_layers

WN_RESIDUAL_SCALE = 0.0  # chosen by measurement, see README "Weight normalization at init"


# -----------------------------------------------------------------------------
# config

class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr, not argparse's usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def make_parser() -> ArgumentParser:
    """Every flag and default of a run; bench.py adds its own to the same parser."""
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_name", default="cifar10", choices=list(utils.NUM_CLASSES),
                   help="synthetic: random images with CIFAR's shape, for benchmarks without a download")
    p.add_argument("--data_path", default=None,
                   help="CIFAR: the folder holding cifar-10-batches-py/ or cifar-100-python/, downloaded there "
                        "if absent (default: data); ImageNet: the folder holding train/ and val/ "
                        "(default: /home/data/imagenet/ILSVRC2012)")
    p.add_argument("--backbone_type", default="resnet18", choices=list(MODELS))
    p.add_argument("--norm_type", default="bn", choices=list(NORMS))
    p.add_argument("--batch_size", default=32, type=positive_int, help="images per step and per process")
    p.add_argument("--epochs", default=90, type=positive_int)
    p.add_argument("--lr", default=1e-3, type=float, help="Adam's learning rate, x0.1 at 50%% and 75%% of epochs")
    p.add_argument("--weight_decay", default=5e-4, type=float, help="L2 penalty, as torch.optim.Adam applies it")
    p.add_argument("--seed", default=0, type=int, help="seeds the weights, the data order and the augmentation")
    p.add_argument("--workers", default=8, type=int, help="DataLoader processes (ImageNet only)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu, ... (default: cuda if there is one)")
    p.add_argument("--results_dir", default="results")
    p.add_argument("--resume", action="store_true",
                   help="continue this configuration from its checkpoint; skip it if finished or diverged")
    p.add_argument("--bf16", default=True, action=argparse.BooleanOptionalAction,
                   help="bf16 autocast on CUDA (--no-bf16: float32)")
    p.add_argument("--compile", default="auto", choices=["auto", "off", "default", "reduce-overhead"],
                   help="torch.compile mode; auto: reduce-overhead (CUDA graphs) on CUDA at batch <= 16, else off")
    p.add_argument("--sync_bn", action="store_true", help="under torchrun, BatchNorm statistics over all ranks")
    p.add_argument("--subset", default=0, type=int, help="use a fixed random N images of each split (0: all)")
    p.add_argument("--init_images", default=512, type=positive_int,
                   help="WN's data-dependent init: training images in its one batch, whatever --batch_size is")
    p.add_argument("--wn_residual_scale", default=WN_RESIDUAL_SCALE, type=float,
                   help="WN: after the init, scale the last layer of every residual branch by this (1: off)")
    return p


def parse_args(argv=None, parser=None) -> argparse.Namespace:
    args = (parser or make_parser()).parse_args(argv)
    args.data_path = args.data_path or utils.DEFAULT_DATA_PATH[args.data_name]
    return args


# Flags a resumed run may change; any other must match the checkpoint's, or the CSV would mix two recipes.
RESUMABLE_CHANGES = {"resume", "device", "workers", "data_path", "results_dir", "compile"}
CHECK_EVERY = 25  # steps between the host syncs that refresh the progress bar and look for NaN and signals


# -----------------------------------------------------------------------------
# setup: processes, device, signals

@dataclass
class Context:
    rank: int
    world: int
    device: torch.device
    autocast: object
    memory_format: torch.memory_format

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def to_device(self, x: torch.Tensor, y: torch.Tensor) -> tuple:
        """A batch on the training device, images in its memory format."""
        return (x.to(self.device, non_blocking=True, memory_format=self.memory_format),
                y.to(self.device, non_blocking=True))

    def log(self, *message) -> None:
        if self.is_main:
            print(*message, flush=True)


def pick_device(name, local_rank: int, quiet: bool) -> torch.device:
    if name is None:
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if not quiet:
            print("notice: no CUDA device found, training on the CPU", file=sys.stderr)
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise utils.UserError(f"--device {name} is not a device name; use e.g. cuda, cuda:0 or cpu") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise utils.UserError(f"--device {name} asked for CUDA, but torch sees no CUDA device; use --device cpu")
    return torch.device("cuda", local_rank) if device.type == "cuda" and device.index is None else device


def setup(args) -> Context:
    """One process, or one of torchrun's: NCCL between GPUs, gloo between CPU processes."""
    rank, world, local_rank = (int(os.environ.get(k, d)) for k, d in
                               (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    device = pick_device(args.device, local_rank, quiet=rank != 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    if world > 1 and not dist.is_initialized():  # sweep.py runs several configurations in one process
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    on_cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_cuda and args.bf16 else nullcontext()
    return Context(rank, world, device, autocast, torch.channels_last if on_cuda else torch.contiguous_format)


class StopSignal:
    """Within `with StopSignal() as stop:`, SIGINT and SIGTERM set stop.signum, which the loop polls after a
    step, its safe point. A second signal of the same kind acts at once, as usual. The handlers before it
    come back at the end, for callers that run several configurations in one process."""

    def __enter__(self):
        self.signum = 0
        self.previous = {s: signal.signal(s, self._catch) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc_info):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _catch(self, signum, frame):
        self.signum = signum
        signal.signal(signum, signal.SIG_DFL)


class Diverged(Exception):
    pass


class Interrupted(Exception):
    pass


def rng_states() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# -----------------------------------------------------------------------------
# one train step, one epoch, one evaluation

def train_step(model, optimizer, x, y, autocast) -> tuple:
    with autocast:
        logits = model(x)
        loss = F.cross_entropy(logits, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), utils.topk_correct(logits.detach(), y, ks=(1,))[0]


def train_one_epoch(model, loader, optimizer, progress: dict, ctx: Context, stop: StopSignal) -> None:
    """Train from progress["step"] to the end of the epoch. progress["sums"] holds this rank's sum of
    losses, correct top-1 and images, on the device so that no step waits for the host. Raises
    Interrupted at the first safe point after a signal, Diverged on a NaN or infinite loss; under DDP all
    ranks agree on both, through an all-reduce every CHECK_EVERY steps."""
    model.train()
    bar = tqdm(total=loader.num_images, initial=min(progress["step"] * loader.batch_size, loader.num_images),
               desc=f"epoch {progress['epoch']}", unit="img", leave=False, dynamic_ncols=True,
               disable=None if ctx.is_main else True)  # None: on a terminal only, not in logs
    sums = progress["sums"]
    for x, y in loader:
        x, y = ctx.to_device(x, y)
        loss, correct = train_step(model, optimizer, x, y, ctx.autocast)
        sums[0] += loss.float() * len(y)
        sums[1] += correct
        sums[2] += len(y)
        progress["step"] += 1
        bar.update(len(y))
        if progress["step"] % CHECK_EVERY == 0 or (ctx.world == 1 and stop.signum):
            flags = torch.stack([sums[0], torch.tensor(float(stop.signum), device=sums.device)])
            loss_sum, stopping = ctx.all_sum(flags).tolist()
            if not math.isfinite(loss_sum):
                raise Diverged(f"loss became {loss_sum} in epoch {progress['epoch']} by step {progress['step']}")
            if stopping:
                raise Interrupted()
            bar.set_postfix(loss=f"{sums[0] / sums[2]:.3f}", top1=f"{100 * sums[1] / sums[2]:.2f}")
    bar.close()


@torch.no_grad()
def evaluate(model, loader, ctx: Context) -> dict:
    model.eval()
    sums = torch.zeros(4, device=ctx.device)  # sum of losses, correct top-1, correct top-5, images
    for x, y in loader:
        x, y = ctx.to_device(x, y)
        with ctx.autocast:
            logits = model(x)
        sums[0] += F.cross_entropy(logits.float(), y, reduction="sum")
        sums[1:3] += utils.topk_correct(logits, y)
        sums[3] += len(y)
    loss_sum, top1, top5, n = ctx.all_sum(sums).tolist()
    return {"loss": loss_sum / n, "top1": 100 * top1 / n, "top5": 100 * top5 / n}


# -----------------------------------------------------------------------------
# model, optimizer, checkpoints

def build(args, ctx: Context, train_loader) -> tuple:
    """(model, train_model, optimizer, scheduler, (params, flops)). train_model is model as the train step
    calls it: wrapped for DDP and compiled where asked; evaluation and checkpoints use model itself."""
    model = build_model(args.backbone_type, args.norm_type, utils.NUM_CLASSES[args.data_name],
                        cifar_stem=args.data_name != "imagenet")
    counts = utils.count_params_flops(model, utils.IMAGE_SIZE[args.data_name])
    model.to(ctx.device)
    if wn_layers(model):  # before DDP wraps the model, whose constructor hands every rank rank 0's values
        data_dependent_init(model, train_loader.init_batch(args.init_images).to(ctx.device))
        scale_residual_branches(model, args.wn_residual_scale)
    if args.sync_bn and ctx.world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(ctx.device, memory_format=ctx.memory_format)
    train_model = model
    if ctx.world > 1:
        device_ids = None if ctx.device.type == "cpu" else [ctx.device.index]
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if compile_mode(args, ctx) != "off":
        train_model = torch.compile(train_model, mode=compile_mode(args, ctx))
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                                 fused=ctx.device.type == "cuda")
    milestones = sorted({args.epochs // 2, args.epochs * 3 // 4})  # a set: at 2 epochs, one drop, not two
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)
    return model, train_model, optimizer, scheduler, counts


def compile_mode(args, ctx: Context) -> str:
    if args.compile != "auto":
        return args.compile
    # Small batches are bound by kernel launches, which CUDA graphs remove. BatchNorm's running-statistics
    # updates are buffer mutations that the graphs replay in place; the last, smaller batch of an epoch
    # records a second graph once.
    return "reduce-overhead" if ctx.device.type == "cuda" and args.batch_size <= 16 else "off"


def new_progress(epoch: int, device: torch.device) -> dict:
    """Where the run stands: the epoch under way, the next step in it, and what it has summed so far."""
    return {"epoch": epoch, "step": 0, "sums": torch.zeros(3, device=device), "seconds": 0.0}


def resume_checkpoint(args, files: utils.RunFiles, status, ctx: Context):
    """The checkpoint to continue from, or None to start afresh; refuses to clobber earlier results."""
    if not args.resume:
        if files.started() or status:
            raise utils.UserError(f"{files.name} already has results in {files.dir}; pass --resume to continue "
                                  f"it (or skip it if it is finished), or choose another --results_dir")
        return None
    checkpoint = files.load_checkpoint(ctx.device)
    if checkpoint is None:
        return None
    for key, saved in checkpoint["args"].items():
        if key not in RESUMABLE_CHANGES and getattr(args, key, saved) != saved:
            raise utils.UserError(f"--{key} is {getattr(args, key)} but {files.checkpoint} was made with {saved}; "
                                  f"resume with the same --{key}")
    if checkpoint["args"]["world_size"] != ctx.world:
        raise utils.UserError(f"{files.checkpoint} was made by {checkpoint['args']['world_size']} processes, "
                              f"this run has {ctx.world}; resume with the same number")
    return checkpoint


def checkpoint_state(model, optimizer, scheduler, progress: dict, history: list, run_args: dict) -> dict:
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "progress": {**progress, "sums": progress["sums"].cpu()}, "history": history, "rng": rng_states(),
            "args": run_args}


def restore(checkpoint: dict, model, optimizer, scheduler, ctx: Context) -> tuple:
    """(history, progress) from a checkpoint; the model, optimizer, scheduler and RNGs are loaded in place."""
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    set_rng_states(checkpoint["rng"])
    progress = {**checkpoint["progress"], "sums": checkpoint["progress"]["sums"].to(ctx.device)}
    if not ctx.is_main:  # the saved sums are all ranks' together; rank 0 carries them
        progress["sums"].zero_()
    return checkpoint["history"], progress


def save_epoch(files: utils.RunFiles, state: dict, summary: dict, finished: bool) -> None:
    """An epoch's end on disk. The checkpoint lands before the CSV, so the CSV never runs ahead of what a
    resume restores, and the final weights before the summary says "finished"."""
    files.save_checkpoint(state)
    if finished:
        files.save_weights({"model": state["model"], "args": state["args"]})
    files.write_history(state["history"])
    files.write_summary(summary_row(summary, state["history"], "finished" if finished else "incomplete"))


def summary_row(base: dict, history: list, status: str) -> dict:
    row = {**base, "epochs_done": len(history), "status": status}
    if history:
        best = max(history, key=lambda r: r["test_top1"])
        row.update(best_top1=best["test_top1"], best_top5=best["test_top5"],
                   final_top1=history[-1]["test_top1"], final_top5=history[-1]["test_top5"])
    return row


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def main(args: argparse.Namespace) -> None:
    # -------------------------------------------------------------------------
    # setup
    ctx = setup(args)
    files = utils.RunFiles(args.results_dir, args, enabled=ctx.is_main)
    status = files.status()
    if args.resume and status in utils.DONE:
        ctx.log(f"{files.name} is already {status} in {files.dir}; nothing to do")
        return
    checkpoint = resume_checkpoint(args, files, status, ctx)

    # -------------------------------------------------------------------------
    # data
    train_loader, test_loader = utils.build_loaders(args, ctx.device, ctx.rank, ctx.world)

    # -------------------------------------------------------------------------
    # model
    model, train_model, optimizer, scheduler, (params, flops) = build(args, ctx, train_loader)
    history, progress = [], new_progress(1, ctx.device)
    if checkpoint:
        history, progress = restore(checkpoint, model, optimizer, scheduler, ctx)
        ctx.log(f"resuming {files.name} at epoch {progress['epoch']}, step {progress['step']}")
    run_args = {**vars(args), "world_size": ctx.world}  # saved with the results, the checkpoint and the weights
    files.write_args(run_args)
    summary = {**files.config, "epochs": args.epochs, "params_m": round(params / 1e6, 2), "flops": flops,
               "world_size": ctx.world, "device": device_name(ctx.device)}
    ctx.log(f"{files.name}: {params / 1e6:.2f}M params, {utils.human(flops)} FLOPs, "
            f"{ctx.world} x {device_name(ctx.device)}")

    # -------------------------------------------------------------------------
    # loop
    with StopSignal() as stop:
        try:
            while progress["epoch"] <= args.epochs:
                epoch, lr = progress["epoch"], optimizer.param_groups[0]["lr"]
                train_loader.set_epoch(epoch, progress["step"])
                start = time.time()
                try:
                    train_one_epoch(train_model, train_loader, optimizer, progress, ctx, stop)
                finally:
                    progress["seconds"] += time.time() - start
                loss_sum, top1, n = ctx.all_sum(progress["sums"].clone()).tolist()
                if not math.isfinite(loss_sum):
                    raise Diverged(f"loss became {loss_sum} in epoch {epoch}")
                start = time.time()
                test = evaluate(model, test_loader, ctx)
                history.append({"epoch": epoch, "lr": lr, "train_loss": loss_sum / n, "train_top1": 100 * top1 / n,
                                "test_loss": test["loss"], "test_top1": test["top1"], "test_top5": test["top5"],
                                "seconds": progress["seconds"] + time.time() - start})
                scheduler.step()
                progress = new_progress(epoch + 1, ctx.device)
                state = checkpoint_state(model, optimizer, scheduler, progress, history, run_args)
                save_epoch(files, state, summary, finished=epoch == args.epochs)
                ctx.log(f"epoch {epoch}/{args.epochs}: train loss {history[-1]['train_loss']:.4f} "
                        f"top-1 {history[-1]['train_top1']:.2f}% | test loss {test['loss']:.4f} "
                        f"top-1 {test['top1']:.2f}% top-5 {test['top5']:.2f}%")
        except Diverged as e:
            files.write_history(history)  # as it was, but written even when no epoch finished
            files.write_summary(summary_row(summary, history, "diverged"))
            raise utils.RunDiverged(f"{files.name} diverged: {e}. Its {len(history)} finished epochs are in "
                                    f"{files.statistics}, and summary.csv marks it diverged; a lower --lr may help"
                                    ) from None
        except Interrupted:
            progress["sums"] = ctx.all_sum(progress["sums"])  # all ranks' partial sums, carried by rank 0 on resume
            files.save_checkpoint(checkpoint_state(model, optimizer, scheduler, progress, history, run_args))
            command = " ".join(["python", *sys.argv] + ([] if args.resume else ["--resume"]))
            raise utils.UserError(f"stopped by {signal.Signals(stop.signum).name} in epoch {progress['epoch']} "
                                  f"after step {progress['step']}; {files.checkpoint} is saved. Continue with: "
                                  f"{command}", exit_code=128 + stop.signum) from None


if __name__ == "__main__":
    utils.run_cli(lambda: main(parse_args()), "cls.py")
