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

Every flag and its default: recipe.py's make_parser. A run is its recipe at a seed; its files go to
{results_dir}/{recipe}/seed{N}/, the folder named by what it trains (cifar10_resnet18_wn_32_lr0.003): args.json,
statistics.csv, layers.csv, checkpoint.pth (dropped when it finishes), model.pth and TensorBoard's events
(docs/reliability.md).
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
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import (NORMS, blocks, build_model, count_params_flops, data_dependent_init, largest_output, min_width,
                   scale_residual_branches, weight_layers)
from recipe import Recipe, make_parser
from utils import runtime
from utils.agc import AGC_OFF, AdaptiveGradClip
from utils.board import Board
from utils.cli import RunDiverged, UserError, flag_error, run_cli
from utils.data import DATASETS, build_loaders, resolve_path
from utils.layerstats import LayerStats
from utils.metrics import human, topk_correct
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
    args.data_path = resolve_path(args.data_name, args.data_path)
    return args


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
                    raise runtime.Interrupted(progress)
                shown.update(images_done(), totals.loss, totals.top1)
    finally:
        shown.close()


@torch.no_grad()
def evaluate(model, loader, ctx: runtime.Context) -> dict:
    """The mean loss, top-1 and top-5 over the loader's images, all ranks together; None for no loader."""
    if loader is None:
        return dict.fromkeys(("loss", "top1", "top5"))
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

def make_optimizer(model: nn.Module, recipe: Recipe, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (decoupled decay, Loshchilov & Hutter 2019) or Adam (L2 added to the gradient, the original's) at
    the recipe's peak lr, with parameters grouped by role as timm's param_groups_weight_decay: the decay acts
    on conv and linear weights (WN's v and WS's raw weight among them), never on gains (WN's g, scaled WS's
    gain, norm affines) or biases, as DeepMind's NFNet optimizer. Under Adam's coupled L2, the weight of a
    layer with its own gain (WN's v, scaled WS's weight) is left undecayed too: w depends on v / ||v|| only,
    so L2 changes nothing the loss sees, and Adam scales it to a step of about lr per element, which
    collapses ||v|| where the loss gives v no gradient (g = 0) and makes the gradient through g v / ||v||
    explode once g moves: WN went NaN this way on an H100 (docs/recipe.md)."""
    decayed = {id(layer.direction) for layer in weight_layers(model).values()
               if recipe.optimizer == "adamw" or layer.gain is None}
    params = list(model.parameters())
    groups = [{"params": [p for p in params if id(p) in decayed], "weight_decay": recipe.weight_decay},
              {"params": [p for p in params if id(p) not in decayed], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW if recipe.optimizer == "adamw" else torch.optim.Adam
    return optimizer(groups, lr=recipe.peak_lr(), fused=device.type == "cuda")


def make_agc(model: nn.Module, recipe: Recipe) -> AdaptiveGradClip:
    """AGC (--agc) on every conv's weight tensor, WN's v and WS's raw weight among them, by role as the
    optimizer's groups: not on gains, biases or norm affines, and never on the final linear, which Brock et
    al. 2021b (section 4.1) found better left unclipped."""
    layers = weight_layers(model).values()
    return AdaptiveGradClip([layer.direction for layer in layers if layer.module is not model.fc], recipe.agc)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """The learning rate of step `step` (0-based, of `total`) as a fraction of the peak: a linear warmup to 1
    over the first `warmup` steps, then a cosine to 0 at the end of the run, or x0.1 at 50% and at 75% of it."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "step":
        return 0.1 ** sum(step >= int(total * f) for f in (0.5, 0.75))
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def make_scheduler(optimizer, recipe: Recipe, steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    # One pure function of the step inside torch's LambdaLR: exact at any step, so a resumed run replays it,
    # where chaining LinearLR and CosineAnnealingLR in SequentialLR computes the cosine recursively.
    total, warmup = recipe.epochs * steps_per_epoch, round(recipe.warmup_epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(optimizer,
                                             lambda step: lr_factor(step, total, warmup, recipe.lr_schedule))


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
    model = build_model(recipe.backbone_type, recipe.norm_type, data.num_classes,
                        cifar_stem=DATASETS[recipe.data_name].image_size == 32, width=recipe.width)
    params, flops = count_params_flops(model, DATASETS[recipe.data_name].image_size)
    model.to(ctx.device)
    initialize(model, recipe, data, ctx)  # before DDP wraps the model, whose constructor hands every rank rank 0's
    if recipe.sync_bn:
        model = NORMS[recipe.norm_type].sync(model)
    model = model.to(ctx.device, memory_format=ctx.memory_format)
    train_model = model
    if ctx.world > 1:
        device_ids = None if ctx.device.type == "cpu" else [ctx.device.index]
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    mode = compile_mode(args, ctx.device, ctx.world)
    if mode != "off":
        train_model = torch.compile(train_model, mode=mode)
    optimizer = make_optimizer(model, recipe, ctx.device)
    probe = ctx.to_device(*data.train.init_batch(PROBE_IMAGES)) if args.layer_stats else None
    stats = LayerStats(model, weight_layers(model), blocks(model), probe, ctx.autocast)
    return Run(model, train_model, optimizer, make_scheduler(optimizer, recipe, len(data.train)), stats,
               make_agc(model, recipe), params, flops)


# -----------------------------------------------------------------------------
# the loop

def run_epoch(run: Run, data, record: RunRecord, board: Board, progress: Progress, ctx: runtime.Context,
              stop: runtime.StopSignal, epochs: int) -> Progress:
    """Finish the epoch under way, evaluate it, and record it; returns the progress of the next epoch."""
    epoch = progress.epoch
    data.train.set_epoch(epoch, progress.step)
    start = time.time()
    try:
        train_one_epoch(run, data.train, progress, ctx, stop, epochs, board)
    finally:
        progress.seconds += time.time() - start
    train = progress.totals(ctx)
    start = time.time()
    test, val = evaluate(run.model, data.test, ctx), evaluate(run.model, data.val, ctx)
    if not math.isfinite(test["loss"]):  # NaN logits still give a top-1: a number that is no result
        raise runtime.Diverged(f"the test loss became {test['loss']} in epoch {epoch}")
    row = EpochRow(epoch, progress.lr, train.loss, train.top1, test["loss"], test["top1"], test["top5"],
                   progress.seconds + time.time() - start, val["loss"], val["top1"], val["top5"])
    layer_rows, following = run.layer_stats.rows(epoch), Progress.start(epoch + 1, run.optimizer, ctx.device)
    if epoch < epochs:
        record.end_epoch(row, layer_rows, run.state(following, ctx))
    else:
        record.finish(row, layer_rows, run.model.state_dict(), run.state(following, ctx))
    board.epoch(row, layer_rows)
    ctx.log(f"epoch {epoch}/{epochs}: train loss {train.loss:.4f} top-1 {train.top1:.2f}% | test loss "
            f"{test['loss']:.4f} top-1 {test['top1']:.2f}% top-5 {test['top5']:.2f}% | "
            + (f"val top-1 {val['top1']:.2f}% | " if data.val else "") + f"{row.seconds:.1f} s")
    return following


@contextmanager
def stopping(record: RunRecord, run: Run, ctx: runtime.Context):
    """The loop's StopSignal. A divergence, or a signal, is recorded as such and ends the run with one line."""
    with runtime.StopSignal() as stop:
        try:
            yield stop
        except runtime.Diverged as e:
            record.diverge(str(e))
            raise RunDiverged(f"{record.name} diverged: {e}. Its {len(record.epochs)} finished epochs are in "
                              f"{record.statistics}, and it is recorded as diverged") from None
        except runtime.Interrupted as e:
            record.interrupt(run.state(e.progress, ctx))
            command = shlex.join([*runtime.launcher(), *sys.argv] + ([] if "--resume" in sys.argv else ["--resume"]))
            raise UserError(f"stopped by {signal.Signals(stop.signum).name} in epoch {e.progress.epoch} after step "
                            f"{e.progress.step}; {record.checkpoint} is saved. Continue with: {command}",
                            exit_code=128 + stop.signum) from None


def run_head(args, record: RunRecord, ctx: runtime.Context, data, run: Run) -> dict:
    """The run's args.json: its recipe and seed, every flag as given, where and how it ran, what it trained on."""
    return {"name": record.name, "recipe": record.recipe.to_json(), "seed": args.seed, "flags": vars(args),
            "device": str(ctx.device), "compile": compile_mode(args, ctx.device, ctx.world),
            "peak_lr": record.recipe.peak_lr(), "data_fingerprint": data.fingerprint, "train_images": data.train_images,
            "params": run.params, "flops": run.flops, **provenance(ctx.device_name)}


def say_what_does_nothing(args, recipe: Recipe, ctx: runtime.Context) -> None:
    if args.device is None and ctx.device.type == "cpu":  # here, not first: an error before it is one line alone
        ctx.log("notice: no CUDA device found, training on the CPU")
    for flag in recipe.unused(args):
        ctx.log(f"notice: --{flag} does nothing for --norm_type {recipe.norm_type} on {ctx.world} process(es)")


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


def main(args: argparse.Namespace) -> None:
    """One run: trained from the start, resumed from its checkpoint, or left alone if it is a result already.
    Its folder is made only once the data and the network have passed their checks, and it is asked again,
    under the run's lock, whether another process finished it meanwhile."""
    ctx = runtime.setup(args)
    with ctx.main_first():  # rank 0 downloads the data whose size a default may need
        record = RunRecord.of_args(args, ctx.device.type, ctx.world, enabled=ctx.is_main)
    if left_alone(record, args, ctx):
        return
    data = build_loaders(args, ctx)
    run = build(record.recipe, args, ctx, data)
    with record:
        if left_alone(record, args, ctx):
            return
        head = run_head(args, record, ctx, data, run)
        checkpoint = record.resumable(head) if args.resume else None
        progress = (run.load(checkpoint["state"], ctx, record.checkpoint) if checkpoint
                    else Progress.start(1, run.optimizer, ctx.device))
        record.start(head, checkpoint)
        say_what_does_nothing(args, record.recipe, ctx)
        ctx.log(f"{record.name}: {run.params / 1e6:.2f}M params, {human(run.flops)} FLOPs, {ctx.world} x "
                f"{ctx.device_name}" + (f"; curves as it trains: tensorboard --logdir {args.results_dir}"
                                        if args.tensorboard else ""))
        board = Board(record.dir, args.tensorboard and ctx.is_main, len(data.train), progress,
                      weight_layers(run.model), {**record.recipe, "seed": args.seed})
        with board, stopping(record, run, ctx) as stop:
            while progress.epoch <= record.recipe.epochs:
                progress = run_epoch(run, data, record, board, progress, ctx, stop, record.recipe.epochs)
    written = [record.statistics] + ([record.layers_csv] if record.layers else [])
    ctx.log(f"{record.name} finished: results in {', '.join(map(str, written))}; weights in {record.weights}")


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()), "cls.py")
