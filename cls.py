"""Train and evaluate a ResNet or ResNeXt classifier with bn, in, wn, wn_mbn, gn, ws_gn or sws as its normalization.

Examples:
    python cls.py                                          # ResNet-18, bn, CIFAR-10, batch 32, 90 epochs
    python cls.py --norm_type wn                           # weight normalization, the same recipe
    python cls.py --norm_type sws --agc 0.01               # NF-ResNet's conv and adaptive gradient clipping
    python cls.py --data_name cifar100 --batch_size 2
    python cls.py --backbone_type resnext50 --norm_type wn_mbn --epochs 30
    python cls.py --optimizer adam --lr_schedule step --weight_decay 5e-4 --warmup_epochs 0   # the original's recipe
    python cls.py --batch_size 256 --lr_scaling sqrt         # peak lr 1e-3 x sqrt(256 / 32) (docs/statistics.md)
    python cls.py --norm_type wn --batch_size 2 --seed 0 1 2 3    # four runs, packed into one network where it pays
    python cls.py --seed 0 1 --lr 1e-3 3e-3                # two runs: seed 0 at lr 1e-3, seed 1 at lr 3e-3
    python cls.py --data_name imagenet --data_path /home/data/imagenet/ILSVRC2012 --workers 16
    torchrun --nproc_per_node 8 cls.py --data_name imagenet --batch_size 32    # 32 per GPU, 256 in all
    python cls.py --norm_type wn --resume                  # continue (or skip, if done) a stopped run

Every flag and its default: recipe.py's make_parser. A run is its recipe at a seed; its files go to
{results_dir}/{recipe}/seed{N}/, the folder named by what it trains (cifar10_resnet18_wn_32_lr0.003): args.json,
statistics.csv, layers.csv, checkpoint.pth (dropped when it finishes), model.pth and TensorBoard's events
(docs/reliability.md). Several values of --seed, --lr or --weight_decay are several runs, the i-th taking the
i-th value of each (or its only one); up to --pack of them train as one packed network (utils/pack.py), each
writing its own folder as it would alone (docs/speed.md).
"""
from utils.cli import exit_on_ctrl_c

if __name__ == "__main__":
    exit_on_ctrl_c("cls.py")  # before the imports below, which take seconds (flake8: E402 is meant)

import argparse
import dataclasses
import math
import shlex
import signal
import sys
import time
from contextlib import ExitStack, contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import (NORMS, blocks, build_model, counts, data_dependent_init, largest_output, min_width,
                   scale_residual_branches, weight_layers)
from recipe import Recipe, make_parser, split_runs
from utils import pack as packing, runtime
from utils.board import Board
from utils.cli import RunDiverged, UserError, flag_error, run_cli
from utils.data import DATASETS, build_loaders, resolve_path
from utils.layerstats import LayerStats
from utils.metrics import human
from utils.optim import make_agc, make_optimizer, make_scheduler
from utils.pack import Member, Pack, Run
from utils.progress import EpochProgress, Progress
from utils.record import DONE, EpochRow, RunRecord, provenance

PROBE_IMAGES = 128  # the layer statistics' fixed batch
CHECK_IMAGES = 8  # the init's output is checked finite on these, in eval mode: no batch statistics
SYNC_EVERY = 25  # steps between the host syncs that look for NaN and signals, at most; 10 per epoch at least


def parse_args(argv=None, parser=None) -> argparse.Namespace:
    """The flags as given, checked against each other; --data_path as it is used. bench.py passes a parser of
    its own, make_parser's with its flags added."""
    parser = parser or make_parser(__doc__)
    args = parser.parse_args(argv)
    smallest = min_width(args.backbone_type, args.norm_type)
    if args.width < smallest:
        parser.error(f"argument --width: must be at least {smallest} for --backbone_type {args.backbone_type} with "
                     f"--norm_type {args.norm_type}, got {args.width}")
    if NORMS[args.norm_type].data_init and args.subset == 1:
        parser.error(f"argument --subset: must be 0 or at least 2 for --norm_type {args.norm_type}, whose init "
                     f"standardizes each channel over a batch of training images, got 1")
    try:
        split_runs(args)
    except ValueError as e:
        parser.error(str(e))
    args.data_path = resolve_path(args.data_name, args.data_path)
    return args


# -----------------------------------------------------------------------------
# one train step, one epoch, one evaluation

def train_step(pack: Pack, x, y, autocast) -> tuple:
    """One step of every member on its own batch: x (B, K x 3, H, W), y (B, K). Returns each member's mean loss
    and correct top-1, (K,) each, left on the device. A frozen member (live False) adds nothing to the loss,
    and its optimizer takes no step."""
    with autocast:
        logits = pack.model(x)  # (B, K, classes)
        losses = F.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(0)  # (K,)
        loss = torch.where(pack.live, losses, 0).sum()  # each member's gradient is its loss's alone
    pack.net.zero_grad()
    loss.backward()
    for run in pack.live_runs():
        run.agc.clip()
        run.optimizer.step()
        run.scheduler.step()
    return losses.detach(), (logits.detach().argmax(-1) == y).sum(0)


def train_one_epoch(pack: Pack, progress: Progress, ctx: runtime.Context, stop: runtime.StopSignal,
                    epochs: int) -> None:
    """Train from progress.step to the end of the epoch. Raises Interrupted at the first safe point after a
    signal; under DDP all ranks agree on it, through the all-reduce of Progress.totals every few steps, where a
    member whose loss went NaN or infinite is frozen (and the pack ends, Diverged, with none left)."""
    loader = pack.loader

    def images_done() -> int:  # in this epoch, all ranks together
        return ctx.world * min(progress.step * loader.batch_size, loader.num_images)

    pack.model.train()
    every = max(1, min(SYNC_EVERY, len(loader) // 10))
    shown = EpochProgress(progress.epoch, epochs, ctx.world * loader.num_images, images_done(), ctx.is_main)
    try:
        for x, y in loader:
            losses, correct = train_step(pack, *ctx.to_device(x, y), ctx.autocast)
            progress.loss += losses.to(progress.loss.dtype) * len(y)
            progress.correct += correct
            progress.images += len(y)
            progress.step += 1
            if progress.step % every == 0 or (ctx.world == 1 and stop.signum):
                totals = progress.totals(ctx, stop.signum)
                for k, m in pack.live_members():
                    if not math.isfinite(totals.loss[k]):
                        pack.freeze(k, f"loss became {totals.loss[k]} in epoch {progress.epoch} by step "
                                       f"{progress.step}", ctx)
                    else:  # the stopping step's point too
                        m.board.step(progress, totals, m.run.optimizer.param_groups[0]["lr"])
                if totals.stopping:
                    raise runtime.Interrupted(progress)
                shown.update(images_done(), *totals.mean([k for k, _ in pack.live_members()]))
    finally:
        shown.close()


@torch.no_grad()
def evaluate(model, loader, ctx: runtime.Context, k: int) -> list:
    """Each of the k members' mean loss, top-1 and top-5 over the loader's images, all ranks together; Nones
    for no loader."""
    if loader is None:
        return [dict.fromkeys(("loss", "top1", "top5"))] * k
    model.eval()
    sums = torch.zeros(4, k, device=ctx.device)  # sums of losses, correct top-1, correct top-5, images
    for x, y in loader:
        x, y = ctx.to_device(x, y)
        with ctx.autocast:
            logits = model(x.repeat(1, k, 1, 1)).float()  # every member's, on the same images: (B, K, classes)
        y = y[:, None].expand(-1, k)
        sums[0] += F.cross_entropy(logits.transpose(1, 2), y, reduction="none").sum(0)
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices == y[..., None]  # (B, K, 5)
        sums[1] += top[..., 0].sum(0)
        sums[2] += top.any(-1).sum(0)
        sums[3] += len(y)
    loss, top1, top5, n = ctx.all_sum(sums).tolist()
    return [{"loss": loss[i] / n[i], "top1": 100 * top1[i] / n[i], "top5": 100 * top5[i] / n[i]} for i in range(k)]


# -----------------------------------------------------------------------------
# model, optimizer, schedule

def initialize(model: nn.Module, recipe: Recipe, data, ctx: runtime.Context) -> None:
    """The norm's own init, before the first step: WN's data-dependent one on a batch of --init_images
    training images, then the residual branches scaled by --residual_scale (WN's and sws's)."""
    norm, n = NORMS[recipe.norm_type], recipe.init_images
    if norm.data_init:
        if n > data.train_images:
            raise flag_error("--init_images", f"must be at most {data.train_images}, the training images, got {n}")
        try:
            data_dependent_init(model, data.train.init_batch(n)[0].to(ctx.device))
        except ValueError as e:  # a channel with no spread on this batch: g = 1/std would be infinite
            raise flag_error("--init_images", f"{e} on the init batch of {n} images; use more images") from None
        except (torch.OutOfMemoryError, MemoryError):
            raise flag_error("--init_images", f"{n} init images do not fit in the memory of {ctx.device} in one "
                                              f"batch; use fewer") from None
    if norm.scales_residuals:
        scale_residual_branches(model, recipe.residual_scale)
    # An output that is not finite before any step would be recorded as a run that diverged: --residual_scale
    # 1e308 multiplies every residual branch by 1e308, inf in float32.
    worst = largest_output(model, data.train.init_batch(min(CHECK_IMAGES, data.train_images))[0].to(ctx.device))
    if not math.isfinite(worst):
        raise flag_error("--residual_scale", f"{recipe.residual_scale} leaves the network's output {worst} after the "
                                             f"init, before any step; use a smaller scale (auto: 1/(blocks in the "
                                             f"stage))")


def build(recipe: Recipe, args, ctx: runtime.Context, data) -> Run:
    """A run's network from its own seed, as a run alone builds it; data: its own, its loader seeded so."""
    runtime.seed(args.seed)
    model = build_model(recipe.backbone_type, recipe.norm_type, data.num_classes,
                        cifar_stem=DATASETS[recipe.data_name].image_size == 32, width=recipe.width)
    model.to(ctx.device)
    initialize(model, recipe, data, ctx)  # before DDP wraps the model, whose constructor hands every rank rank 0's
    if recipe.sync_bn:
        model = NORMS[recipe.norm_type].sync(model)
    model = model.to(ctx.device, memory_format=ctx.memory_format)
    optimizer = make_optimizer(model, recipe, ctx.device)
    probe = ctx.to_device(*data.train.init_batch(PROBE_IMAGES)) if args.layer_stats else None
    stats = LayerStats(model, weight_layers(model), blocks(model), probe, ctx.autocast)
    size = DATASETS[recipe.data_name].image_size
    return Run(model, optimizer, make_scheduler(optimizer, recipe, len(data.train)), stats, make_agc(model, recipe),
               *counts(recipe.backbone_type, recipe.norm_type, data.num_classes, size, recipe.width))


# -----------------------------------------------------------------------------
# the loop

def run_epoch(pack: Pack, data, progress: Progress, ctx: runtime.Context, stop: runtime.StopSignal,
              epochs: int) -> Progress:
    """Finish the epoch under way, evaluate it, and record it for every member that still trains; returns the
    progress of the next epoch."""
    epoch, k = progress.epoch, len(pack.members)
    pack.loader.set_epoch(epoch, progress.step)
    start = time.time()
    try:
        train_one_epoch(pack, progress, ctx, stop, epochs)
    finally:
        progress.seconds += time.time() - start
    train = progress.totals(ctx)
    start = time.time()
    tests, vals = evaluate(pack.net, data.test, ctx, k), evaluate(pack.net, data.val, ctx, k)
    seconds = progress.seconds + time.time() - start  # the pack's: each of its runs took as long
    following = Progress.start(epoch + 1, [m.run.optimizer for m in pack.members], ctx.device)
    states = following.state_dicts(ctx)
    for i, m in pack.live_members():
        test, val = tests[i], vals[i]
        if not math.isfinite(test["loss"]):  # NaN logits still give a top-1: a number that is no result
            pack.freeze(i, f"the test loss became {test['loss']} in epoch {epoch}", ctx)
            continue
        row = EpochRow(epoch, progress.lr[i], train.loss[i], train.top1[i], test["loss"], test["top1"], test["top5"],
                       seconds, val["loss"], val["top1"], val["top5"])
        layer_rows = m.run.layer_stats.rows(epoch)
        if epoch < epochs:
            m.record.end_epoch(row, layer_rows, m.run.state(states[i]))
        else:
            m.record.finish(row, layer_rows, m.run.weights(), m.run.state(states[i]))
        m.board.epoch(row, layer_rows)
        ctx.log(f"epoch {epoch}/{epochs}" + (f" {m.record.name}" if k > 1 else "") + f": train loss "
                f"{row.train_loss:.4f} top-1 {row.train_top1:.2f}% | test loss {row.test_loss:.4f} top-1 "
                f"{row.test_top1:.2f}% top-5 {row.test_top5:.2f}% | "
                + (f"val top-1 {row.val_top1:.2f}% | " if data.val else "") + f"{row.seconds:.1f} s")
    return following


@contextmanager
def stopping(pack: Pack, ctx: runtime.Context):
    """The loop's StopSignal. A signal is recorded as such, each member saving its checkpoint, and ends the
    run with one line; so does a pack whose every member diverged."""
    with runtime.StopSignal() as stop:
        try:
            yield stop
        except runtime.Diverged:
            pass  # each member recorded its own divergence, and said so
        except runtime.Interrupted as e:
            states = e.progress.state_dicts(ctx)
            for i, m in pack.live_members():
                m.record.interrupt(m.run.state(states[i]))
            command = shlex.join([*runtime.launcher(), *sys.argv] + ([] if "--resume" in sys.argv else ["--resume"]))
            saved = ", ".join(str(m.record.checkpoint) for _, m in pack.live_members())
            raise UserError(f"stopped by {signal.Signals(stop.signum).name} in epoch {e.progress.epoch} after step "
                            f"{e.progress.step}; {saved} saved. Continue with: {command}",
                            exit_code=128 + stop.signum) from None


def run_head(m: Member, pack: list, ctx: runtime.Context, data) -> dict:
    """The run's args.json: its recipe and seed, every flag as given, where and how it ran, what it trained on,
    and the runs it trained with, packed (itself alone, when not)."""
    return {"name": m.record.name, "recipe": m.record.recipe.to_json(), "seed": m.args.seed, "flags": vars(m.args),
            "device": str(ctx.device), "compile": runtime.compile_mode(m.args.compile, ctx),
            "peak_lr": m.record.recipe.peak_lr(), "data_fingerprint": data.fingerprint,
            "train_images": data.train_images, "params": m.run.params, "flops": m.run.flops,
            "pack": [other.record.name for other in pack], **provenance(ctx.device_name)}


def left_alone(record: RunRecord, args, ctx: runtime.Context) -> bool:
    """Whether the run is a result already, finished or diverged, which is never trained again. A run that has
    files is refused without --resume: results are never overwritten."""
    status = record.status()
    if status and not args.resume:
        raise UserError(f"{record.name} already has results in {args.results_dir}; pass --resume to continue it (or "
                        f"skip it if it is done), or choose another --results_dir")
    if status in DONE:
        ctx.log(f"{record.name} is already {status} in {args.results_dir}; nothing to do")
    return status in DONE


def still_to_train(members: list, args, ctx: runtime.Context) -> list:
    """The members that are not a result already, as rank 0 reads their files: every rank trains the same runs."""
    keep = ctx.main_decides(lambda: [not left_alone(m.record, args, ctx) for m in members])
    return [m for m, k in zip(members, keep) if k]


def packs(pending: list, args, device_type: str, num_classes: int) -> list:
    """Runs of one recipe but their --seed, --lr and --weight_decay (each with its .record), in packs of at most
    --pack (auto: as many as pay, utils/pack.py) that stand at the same step of their checkpoints, so that a
    pack steps them together. sweep.py packs its grid's runs so too."""
    r = pending[0].record.recipe
    macs = lambda: counts(r.backbone_type, r.norm_type, num_classes, DATASETS[r.data_name].image_size,  # noqa: E731
                          r.width)[1]
    size = packing.pack_size(args.pack, len(pending), device_type, r.batch_size, macs, r.data_name, r.sync_bn)
    return packing.chunks(pending, size, lambda m: m.record.resume_point() if args.resume else (1, 0))


def start(pack: list, ctx: runtime.Context, data) -> Progress:
    """Where the pack starts: its members' checkpoints, each this run's on this data, all at one step; or the
    first step. Writes each member's args.json."""
    heads = [run_head(m, pack, ctx, data) for m in pack]
    checkpoints = [m.record.resumable(head) if m.args.resume else None for m, head in zip(pack, heads)]
    progress = Progress.start(1, [m.run.optimizer for m in pack], ctx.device)
    if checkpoints[0] is not None:
        states = [m.run.load(c["state"], m.record.checkpoint) for m, c in zip(pack, checkpoints)]
        runtime.set_rng_states(checkpoints[0]["state"]["rng"])
        progress = Progress.from_states(states, ctx)
        ctx.log(f"resuming at epoch {progress.epoch}, step {progress.step}")
    for m, head, checkpoint in zip(pack, heads, checkpoints):
        m.record.start(head, checkpoint)
    return progress


def train(pack: list, args, ctx: runtime.Context, data) -> None:
    """A pack of runs, from their start or their checkpoints, to their end. Their folders are made only once
    the data and the networks have passed their checks, and each is asked again, under its run's lock,
    whether another process finished it meanwhile."""
    for m in pack:
        m.run = build(m.record.recipe, m.args, ctx, dataclasses.replace(data, train=data.train.reseeded(m.args.seed)))
    with ExitStack() as held:
        for m in pack:
            held.enter_context(m.record)
        pack = still_to_train(pack, args, ctx)
        if not pack:
            return
        progress = start(pack, ctx, data)
        run = pack[0].run
        ctx.log(f"{', '.join(m.record.name for m in pack)}: {run.params / 1e6:.2f}M params, {human(run.flops)} "
                f"FLOPs, {ctx.world} x {ctx.device_name}" + (f", {len(pack)} runs packed" if len(pack) > 1 else "")
                + (f"; curves as it trains: tensorboard --logdir {args.results_dir}" if args.tensorboard else ""))
        trained = Pack.of(pack, args, ctx, data)
        for k, m in enumerate(pack):
            m.board = held.enter_context(Board(m.record.dir, args.tensorboard and ctx.is_main, len(trained.loader),
                                               progress, weight_layers(m.run.model),
                                               {**m.record.recipe, "seed": m.args.seed}, member=k))
        with stopping(trained, ctx) as stop:
            while progress.epoch <= pack[0].record.recipe.epochs:
                progress = run_epoch(trained, data, progress, ctx, stop, pack[0].record.recipe.epochs)
    for m in pack:
        if m.live:
            written = [m.record.statistics] + ([m.record.layers_csv] if m.record.layers else [])
            ctx.log(f"{m.record.name} finished: results in {', '.join(map(str, written))}; weights in "
                    f"{m.record.weights}")


def main(args: argparse.Namespace) -> None:
    """Each run that args name (several with several --seed, --lr or --weight_decay): trained from the start,
    resumed from its checkpoint, or left alone if it is a result already. Exits 1 if one diverged."""
    ctx = runtime.setup(args)
    with ctx.main_first():  # rank 0 downloads the data whose size a default may need, and makes no folder yet
        pending = [Member(m, RunRecord.of_args(m, ctx.device.type, ctx.world, enabled=ctx.is_main))
                   for m in split_runs(args)]
    pending = still_to_train(pending, args, ctx)
    if not pending:
        return
    if args.device is None and ctx.device.type == "cpu":  # here, not first: an error before it is one line alone
        ctx.log("notice: no CUDA device found, training on the CPU")
    for flag in pending[0].record.recipe.unused(args):
        ctx.log(f"notice: --{flag} does nothing for --norm_type {args.norm_type} on {ctx.world} process(es)")
    grouped = packs(pending, args, ctx.device.type, DATASETS[args.data_name].num_classes)
    data = build_loaders(pending[0].args, ctx)
    for pack in grouped:
        train(pack, args, ctx, data)
    diverged = [m.why() for m in pending if not m.live]
    if diverged:
        raise RunDiverged("; ".join(diverged))


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()), "cls.py")
