"""Benchmarks that print numbers. Speed targets are checked here, never by timed tests.

Takes cls.py's flags. By default it measures one configuration's training throughput two ways in the same
run: our pipeline (device-resident CIFAR, and on CUDA bf16 autocast, channels_last and CUDA graphs, as
cls.py trains) and the standard one (torchvision transforms on PIL images, a DataLoader with --workers,
fp32 eager), as a table with their ratio, the share of the device's bf16 peak, and what one 90-epoch
CIFAR run would take at that speed.

    python bench.py --data_name cifar10 --data_path .data --batch_size 128
    python bench.py --data_name synthetic --batch_size 1 --steps 300
    python bench.py --data_only --batch_size 128 --workers 2        # the two data pipelines alone
    python bench.py --norms bn wn --batch_size 32                   # norms against the first, as cls.py trains
    python bench.py --wn_overhead --batch_size 32                   # WN against plain convs, eager fp32
    python bench.py --layer_stats_cost --batch_size 32              # the layer statistics against an epoch
    python bench.py --tensorboard_cost --batch_size 32              # TensorBoard's writes against an epoch
    python bench.py --pack_speed 1 2 4 8 --norms bn wn gn --batch_sizes 1 2 8 32 --widths 8 64   # packed runs
"""
from utils.cli import exit_on_ctrl_c

if __name__ == "__main__":
    exit_on_ctrl_c("bench.py")  # before the imports below, which take seconds (flake8: E402 is meant)

import argparse
import dataclasses
import itertools
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

import cls
from model import MODELS, NORMS, Norm, ResNet, build_model, conv2d, counts, no_norm, weight_layers
from recipe import Context, Recipe, make_parser, split_runs
from utils import runtime
from utils.board import Board
from utils.cli import natural_int, positive_int, run_cli
from utils.data import DATASETS, build_loaders
from utils.metrics import duration, human
from utils.pack import Member, Pack, pack_size
from utils.progress import Progress, Totals
from utils.record import EpochRow
# Dense bf16 tensor-core peaks from NVIDIA's data sheets, in TFLOP/s; matched in order against the name.
PEAK_BF16_TFLOPS = [("H100 PCIe", 756), ("H100", 989), ("H200", 989), ("A100", 312)]
RUN_IMAGES = 90 * 50_000  # one 90-epoch run on CIFAR's training set


# -----------------------------------------------------------------------------
# the standard pipeline

class PILCifar(torch.utils.data.Dataset):
    """What torchvision.datasets.CIFAR10 does: each image made a PIL image and sent through transforms."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean_std: tuple):
        self.images = images.permute(0, 2, 3, 1).numpy()  # (N, 32, 32, 3) uint8, as torchvision keeps it
        self.labels = labels.tolist()
        self.transform = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                             transforms.ToTensor(), transforms.Normalize(*mean_std)])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple:
        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def standard_loader(args, ours) -> torch.utils.data.DataLoader:
    """The same training images as our loader `ours` holds, read the standard way."""
    n = len(ours.labels)
    images = ours.windows[:n, :, ours.pad, ours.pad].cpu()  # the unpadded, unflipped originals
    dataset = PILCifar(images, ours.labels.cpu(), DATASETS[args.data_name].mean_std)
    return torch.utils.data.DataLoader(dataset, args.batch_size, shuffle=True, num_workers=args.workers,
                                       pin_memory=ours.labels.is_cuda, persistent_workers=args.workers > 0)


# -----------------------------------------------------------------------------
# measuring

def forever(loader, to_device):
    """Batches on the device, epoch after epoch."""
    for epoch in itertools.count(1):
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        for x, y in loader:
            yield to_device(x, y)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(batches, step, args, device: torch.device) -> dict:
    """images/s, ms per step and peak device memory over args.steps steps, after args.warmup untimed ones."""
    for _ in range(args.warmup):
        step(*next(batches))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start, images = time.perf_counter(), 0
    for _ in range(args.steps):
        x, y = next(batches)
        step(x, y)
        images += y.numel()  # (B,), or (B, K) for K packed runs
    sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    return {"images/s": images / seconds, "step (ms)": 1000 * seconds / args.steps, "peak memory (MiB)": peak}


@dataclass
class Pipeline:
    """A way of training: its name, a step function step(x, y), and its batches on the device."""
    name: str
    step: object
    batches: object

    def measure(self, args, ctx: runtime.Context) -> dict:
        return measure(self.batches, self.step, args, ctx.device)


def ours(args, ctx: runtime.Context, data, runs: int = 1) -> tuple:
    """(Pipeline, the first run's Run): the training cls.py runs for args, of `runs` seeds packed."""
    recipe = Recipe.resolve(args, Context.of(args, ctx.device.type, ctx.world))
    members = []
    for seed in range(args.seed, args.seed + runs):
        flags = argparse.Namespace(**{**vars(args), "seed": seed})
        run = cls.build(recipe, flags, ctx, dataclasses.replace(data, train=data.train.reseeded(seed)))
        members.append(Member(flags, None, run))
    pack = Pack.of(members, args, ctx, data)
    name = (f"ours: device-resident data, {'bf16' if recipe.bf16 else 'fp32'}, "
            f"{'channels_last' if ctx.memory_format == torch.channels_last else 'contiguous'}, "
            f"compile={runtime.compile_mode(args.compile, ctx)}")
    step = partial(cls.train_step, pack, autocast=ctx.autocast)
    return Pipeline(name, step, forever(pack.loader, ctx.to_device)), members[0].run


def eager_fp32(model, batches, optimizer=torch.optim.AdamW, **kwargs) -> tuple:
    """(a step function, batches) of plain eager float32 training at a constant learning rate: the standard
    loop, as pytorch/examples' ImageNet script."""
    optimizer = optimizer(model.parameters(), **kwargs)

    def step(x, y):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step, batches


def contiguous(ctx: runtime.Context):
    """The standard pipeline's batches: on the device, in the default memory format."""
    return lambda x, y: (x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True))


def train_pipelines(args, ctx: runtime.Context) -> tuple:
    """({name: measurement} for ours, as cls.py trains, and the standard pipeline; the model's MACs)."""
    data = build_loaders(args, ctx)
    pipeline, run = ours(args, ctx, data)
    results = {pipeline.name: pipeline.measure(args, ctx)}
    torch.manual_seed(args.seed)
    model = build_model(args.backbone_type, args.norm_type, data.num_classes, width=args.width).to(ctx.device)
    standard = Pipeline(f"standard: PIL transforms, DataLoader with {args.workers} workers, fp32 eager",
                        *eager_fp32(model, forever(standard_loader(args, data.train), contiguous(ctx)), lr=args.lr,
                                    weight_decay=args.weight_decay))
    results[standard.name] = standard.measure(args, ctx)
    return results, run.flops


def data_pipelines(args, ctx: runtime.Context) -> dict:
    """{name: measurement} of the two data pipelines alone, batches delivered on the device."""
    noop = lambda x, y: None  # noqa: E731
    train = build_loaders(args, ctx).train
    return {"ours: device-resident crop, flip and normalize": measure(
                forever(train, ctx.to_device), noop, args, ctx.device),
            f"standard: PIL transforms, DataLoader with {args.workers} workers": measure(
                forever(standard_loader(args, train), contiguous(ctx)), noop, args, ctx.device)}


def print_table(results: dict, args, ctx: runtime.Context, macs=None) -> None:
    """The measurements as a markdown table; with the model's MACs, also the achieved TFLOP/s."""
    peak = next((tflops for name, tflops in PEAK_BF16_TFLOPS if name in ctx.device_name), None)
    print(f"{args.backbone_type} {args.norm_type}, {args.data_name}, batch {args.batch_size}, on {ctx.device_name}; "
          f"{args.steps} timed steps after {args.warmup}")
    columns = ["images/s", "step (ms)", "peak memory (MiB)"]
    if macs is not None:
        columns += ["TFLOP/s", "% of bf16 peak", "90 epochs (h:mm:ss)"]
    print("| pipeline | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns))
    for name, r in results.items():
        r["TFLOP/s"] = 6 * (macs or 0) * r["images/s"] / 1e12  # MACs x 2 FLOPs, x 3 for forward and backward
        r["% of bf16 peak"] = 100 * r["TFLOP/s"] / peak if peak else float("nan")
        r["90 epochs (h:mm:ss)"] = duration(RUN_IMAGES / r["images/s"])
        print(f"| {name} | " + " | ".join(r[c] if isinstance(r[c], str) else f"{r[c]:.4g}" for c in columns) + " |")
    first, second = (r["images/s"] for r in results.values())
    print(f"ours / standard images/s: {first / second:.2f}x")
    if macs is not None:
        print("90 epochs: steps only, 90 x 50,000 images at the measured rate; evaluation and compiling come on top")


# -----------------------------------------------------------------------------
# norms against each other

def interleaved(steps: dict, args, ctx: runtime.Context) -> dict:
    """{name: best ms per step} over args.rounds interleaved rounds, so that a drifting clock hits all alike.
    steps: {name: () -> (step function, batches)}, built afresh each round."""
    best = {}
    for _ in range(args.rounds):
        for name, make in steps.items():
            step, batches = make()
            best[name] = min(best.get(name, float("inf")), measure(batches, step, args, ctx.device)["step (ms)"])
    return best


def print_ratios(best: dict, title: str, budget: float) -> None:
    print(f"{title}; best of the rounds")
    print("| net | step (ms) | / first |\n|---|---|---|")
    first = next(iter(best.values()))
    for name, ms in best.items():
        print(f"| {name} | {ms:.2f} | {ms / first:.3f} |")
    last = list(best)[-1]
    print(f"{last} / {list(best)[0]} step time: {best[last] / first:.3f} (budget {budget})")


def compare_norms(args, ctx: runtime.Context) -> None:
    """Each of --norms trained as cls.py trains it (with its compile mode, bf16 and memory format)."""
    data = build_loaders(args, ctx)

    def make(norm):
        pipeline, _ = ours(argparse.Namespace(**{**vars(args), "norm_type": norm}), ctx, data)
        return pipeline.step, pipeline.batches

    best = interleaved({norm: partial(make, norm) for norm in args.norms}, args, ctx)
    bf16 = args.bf16 and ctx.device.type == "cuda"
    print_ratios(best, f"{args.backbone_type}, batch {args.batch_size}, {ctx.device_name}, as cls.py trains "
                       f"(compile={runtime.compile_mode(args.compile, ctx)}, bf16={bf16})", budget=1.15)


def pack_speed(args, ctx: runtime.Context) -> None:
    """K runs packed into one network against the same K one after another, as cls.py trains them, for every
    norm of --norms, width of --widths and batch size of --batch_sizes: images/s of all the runs together."""
    print(f"{args.backbone_type}, {ctx.device_name}, {torch.get_num_threads()} threads, compile="
          f"{runtime.compile_mode(args.compile, ctx)}; images/s of K runs, packed and one after another (= K = 1's); "
          f"best of {args.rounds} interleaved rounds of {args.steps} steps after {args.warmup}")
    sizes = [k for k in args.pack_speed if k > 1]
    print("| norm | width | batch | MACs a run's step | one after another | " +
          " | ".join(f"packed, K = {k}" for k in sizes) + " | auto packs |\n|---|---|---|---|---|" +
          "---|" * (len(sizes) + 1))
    for norm, width, batch in itertools.product(args.norms or [args.norm_type], args.widths or [args.width],
                                                args.batch_sizes or [args.batch_size]):
        config = argparse.Namespace(**{**vars(args), "norm_type": norm, "width": width, "batch_size": batch})
        data = build_loaders(config, ctx)

        def built(k: int) -> tuple:
            pipeline = ours(config, ctx, data, k)[0]
            return pipeline.step, pipeline.batches
        ms = interleaved({k: partial(built, k) for k in [1, *sizes]}, args, ctx)
        rates = {k: k * batch * 1000 / ms[k] for k in ms}  # images a second, all K runs together
        macs = lambda: counts(args.backbone_type, norm, data.num_classes, DATASETS[args.data_name].image_size,  # noqa
                              width)[1]
        auto = pack_size("auto", max(args.pack_speed), ctx.device.type, batch, macs, args.data_name, False)
        print(f"| {norm} | {width} | {batch} | {human(batch * macs())} | {rates[1]:.1f} | " +
              " | ".join(f"{rates[k]:.1f} ({rates[k] / rates[1]:.2f}x)" for k in sizes) + f" | {auto} |", flush=True)


def wn_overhead(args, ctx: runtime.Context) -> None:
    """A WN train step against the same net with plain convs (with bias) and no norm, in eager fp32: the
    cost of the reparameterization alone."""
    plain = Norm("plain", partial(conv2d, bias=True), no_norm)
    b = MODELS[args.backbone_type]
    nets = {"plain convs, no norm": lambda: ResNet(b.block, b.layers, plain, 10, width=args.width),
            "wn": lambda: build_model(args.backbone_type, "wn", 10, width=args.width)}
    x = torch.randn(args.batch_size, 3, 32, 32, device=ctx.device)
    y = torch.randint(0, 10, (args.batch_size,), device=ctx.device)

    def make(net):
        torch.manual_seed(0)
        return eager_fp32(net().to(ctx.device), itertools.repeat((x, y)), torch.optim.Adam)

    best = interleaved({name: partial(make, net) for name, net in nets.items()}, args, ctx)
    print_ratios(best, f"{args.backbone_type}, batch {args.batch_size}, {ctx.device_name}, eager fp32", budget=1.15)


def layer_stats_cost(args, ctx: runtime.Context) -> None:
    """The per-epoch layer statistics against an epoch of training as cls.py runs it (budget: 2% of an epoch)."""
    pipeline, run = ours(args, ctx, build_loaders(args, ctx))
    step_ms = pipeline.measure(args, ctx)["step (ms)"]
    epoch_s = step_ms / 1000 * -(-50_000 // args.batch_size)
    run.layer_stats.rows(0)  # warm-up
    sync(ctx.device)
    start = time.perf_counter()
    for _ in range(args.rounds):
        run.layer_stats.rows(0)
    sync(ctx.device)
    stats_s = (time.perf_counter() - start) / args.rounds
    print(f"{args.backbone_type} {args.norm_type}, batch {args.batch_size}, {ctx.device_name}: a step {step_ms:.2f} "
          f"ms, so an epoch of 50,000 images {epoch_s:.1f} s of steps; the layer statistics ({len(run.layer_stats.y)} "
          f"probe images) {1000 * stats_s:.1f} ms, {100 * stats_s / epoch_s:.3f}% of it (budget 2%)")


def tensorboard_cost(args, ctx: runtime.Context) -> None:
    """TensorBoard's writes in an epoch against the epoch as cls.py trains it: a point at each host sync of an
    epoch of 50,000 images, then the epoch's end (test metrics, layer statistics, gains, a flush)."""
    pipeline, run = ours(args, ctx, build_loaders(args, ctx))
    step_ms = pipeline.measure(args, ctx)["step (ms)"]
    steps = -(-50_000 // args.batch_size)
    epoch_s = step_ms / 1000 * steps
    every = max(1, min(cls.SYNC_EVERY, steps // 10))  # as train_one_epoch syncs
    syncs = range(every, steps + 1, every)
    rows, end = run.layer_stats.rows(1), EpochRow(1, args.lr, 2.3, 10.0, 2.3, 10.0, 50.0, epoch_s)
    seconds = []
    with tempfile.TemporaryDirectory() as folder:
        for i in range(args.rounds):
            progress = Progress.start(1, [run.optimizer], ctx.device)
            with Board(Path(folder) / str(i), True, steps, progress, weight_layers(run.model), {}) as board:
                sync(ctx.device)
                start = time.perf_counter()
                for progress.step in syncs:
                    board.step(progress, Totals([2.3], [10.0], False, progress.step * args.batch_size), args.lr)
                board.epoch(end, rows)
                seconds.append(time.perf_counter() - start)
        size = sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()) / args.rounds
    print(f"{args.backbone_type} {args.norm_type}, batch {args.batch_size}, {ctx.device_name}: an epoch of 50,000 "
          f"images {epoch_s:.1f} s of steps; TensorBoard's {len(syncs)} points and the epoch's end "
          f"({len(rows)} layer rows) {1000 * min(seconds):.1f} ms, {100 * min(seconds) / epoch_s:.4f}% of it, "
          f"{size / 1024:.0f} KiB of events")


def main(argv=None) -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--steps", default=100, type=positive_int, help="timed steps")
    parser.add_argument("--warmup", default=10, type=natural_int, help="untimed steps first (compile, CUDA graphs)")
    parser.add_argument("--data_only", action="store_true", help="time the data pipelines alone")
    parser.add_argument("--norms", nargs="+", choices=list(NORMS), help="time these norms against the first")
    parser.add_argument("--wn_overhead", action="store_true", help="time WN against plain convs, eager fp32")
    parser.add_argument("--layer_stats_cost", action="store_true", help="time the layer statistics against an epoch")
    parser.add_argument("--tensorboard_cost", action="store_true", help="time TensorBoard's writes against an epoch")
    parser.add_argument("--rounds", default=2, type=positive_int, help="--norms, --wn_overhead: interleaved rounds; "
                                                               "--layer_stats_cost, --tensorboard_cost: timed repeats")
    parser.add_argument("--pack_speed", nargs="+", type=positive_int, metavar="K",
                        help="time packs of K runs against K runs one after another, for --norms, --widths, "
                             "--batch_sizes")
    parser.add_argument("--widths", nargs="+", type=positive_int, help="--pack_speed: these --width values")
    parser.add_argument("--batch_sizes", nargs="+", type=positive_int, help="--pack_speed: these --batch_size values")
    args = split_runs(cls.parse_args(argv, parser))[0]  # one run's flags: --pack_speed makes its packs itself
    if args.data_name == "imagenet":
        parser.error("bench.py compares the CIFAR pipelines; use --data_name cifar10, cifar100 or synthetic")
    if args.layer_stats_cost and not args.layer_stats:
        parser.error("--layer_stats_cost times the layer statistics, which --no-layer_stats turns off; drop one")
    ctx = runtime.setup(args)
    if args.pack_speed:
        pack_speed(args, ctx)
    elif args.wn_overhead:
        wn_overhead(args, ctx)
    elif args.layer_stats_cost:
        layer_stats_cost(args, ctx)
    elif args.tensorboard_cost:
        tensorboard_cost(args, ctx)
    elif args.norms:
        compare_norms(args, ctx)
    elif args.data_only:
        print_table(data_pipelines(args, ctx), args, ctx)
    else:
        results, macs = train_pipelines(args, ctx)
        print_table(results, args, ctx, macs)


if __name__ == "__main__":
    run_cli(main, "bench.py")
