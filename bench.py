"""Benchmarks that print numbers. Speed targets are checked here, never by timed tests.

Takes cls.py's flags and measures one configuration's training throughput two ways in the same run: our
pipeline (device-resident CIFAR, bf16 autocast, channels_last, CUDA graphs at small batches, as cls.py
trains) and the standard one (torchvision transforms on PIL images, a DataLoader with --workers, fp32
eager), as a table with their ratio.

    python bench.py --data_name cifar10 --data_path .data --batch_size 128
    python bench.py --data_name synthetic --batch_size 1 --steps 300
    python bench.py --data_only --batch_size 128 --workers 2        # the two data pipelines alone
    python bench.py --wn_overhead --batch_size 32                   # WN's cost against plain convs
"""
import itertools
import time
from contextlib import nullcontext
from functools import partial

import torch
from PIL import Image
from torchvision import transforms

import cls
import utils
from model import MODELS, Norm, ResNet, build_model, conv2d, no_norm

# Dense bf16 tensor-core peaks from NVIDIA's data sheets, in TFLOP/s; matched in order against the name.
PEAK_BF16_TFLOPS = [("H100 PCIe", 756), ("H100", 989), ("H200", 989), ("A100", 312)]


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


def standard_loader(args, device: torch.device) -> torch.utils.data.DataLoader:
    images, labels = utils.load_splits(args)["train"]
    return torch.utils.data.DataLoader(PILCifar(images, labels, utils.MEAN_STD[args.data_name]), args.batch_size,
                                       shuffle=True, num_workers=args.workers, pin_memory=device.type == "cuda",
                                       persistent_workers=args.workers > 0)


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
        images += len(y)
    sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    return {"images/s": images / seconds, "step (ms)": 1000 * seconds / args.steps, "peak memory (MiB)": peak}


def contiguous(ctx: cls.Context):
    """The standard pipeline's batches: on the device, in the default memory format."""
    return lambda x, y: (x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True))


def train_pipelines(args, ctx: cls.Context) -> tuple:
    """({name: measurement} for ours, as cls.py trains, and the standard pipeline; the model's MACs)."""
    torch.manual_seed(args.seed)
    loader = utils.build_loaders(args, ctx.device)[0]
    _, train_model, optimizer, _, (_, macs) = cls.build(args, ctx, loader)
    ours = forever(loader, ctx.to_device)
    name = (f"ours: device-resident data, {'bf16' if args.bf16 and ctx.device.type == 'cuda' else 'fp32'}, "
            f"{'channels_last' if ctx.memory_format == torch.channels_last else 'contiguous'}, "
            f"compile={cls.compile_mode(args, ctx)}")
    results = {name: measure(ours, lambda x, y: cls.train_step(train_model, optimizer, x, y, ctx.autocast),
                             args, ctx.device)}
    torch.manual_seed(args.seed)
    model = build_model(args.backbone_type, args.norm_type, utils.NUM_CLASSES[args.data_name]).to(ctx.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    standard = forever(standard_loader(args, ctx.device), contiguous(ctx))
    results[f"standard: PIL transforms, DataLoader with {args.workers} workers, fp32 eager"] = measure(
        standard, lambda x, y: cls.train_step(model, optimizer, x, y, nullcontext()), args, ctx.device)
    return results, macs


def data_pipelines(args, ctx: cls.Context) -> dict:
    """{name: measurement} of the two data pipelines alone, batches delivered on the device."""
    noop = lambda x, y: None  # noqa: E731
    return {"ours: device-resident crop, flip and normalize": measure(
                forever(utils.build_loaders(args, ctx.device)[0], ctx.to_device), noop, args, ctx.device),
            f"standard: PIL transforms, DataLoader with {args.workers} workers": measure(
                forever(standard_loader(args, ctx.device), contiguous(ctx)), noop, args, ctx.device)}


def print_table(results: dict, args, ctx: cls.Context, macs=None) -> None:
    """The measurements as a markdown table, with achieved TFLOP/s where the model's MACs are given."""
    device = cls.device_name(ctx.device)
    peak = next((tflops for name, tflops in PEAK_BF16_TFLOPS if name in device), None)
    with_flops = macs is not None
    print(f"{args.backbone_type} {args.norm_type}, {args.data_name}, batch {args.batch_size}, on {device}; "
          f"{args.steps} timed steps after {args.warmup}")
    columns = ["images/s", "step (ms)", "peak memory (MiB)"] + (["TFLOP/s", "% of bf16 peak"] if with_flops else [])
    print("| pipeline | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns))
    for name, r in results.items():
        if with_flops:  # FLOPs: thop's multiply-accumulates x 2, x 3 for the forward and the backward pass
            r["TFLOP/s"] = 6 * macs * r["images/s"] / 1e12
            r["% of bf16 peak"] = 100 * r["TFLOP/s"] / peak if peak else float("nan")
        print(f"| {name} | " + " | ".join(f"{r[c]:.4g}" for c in columns) + " |")
    ours, standard = (r["images/s"] for r in results.values())
    print(f"ours / standard images/s: {ours / standard:.2f}x")


# -----------------------------------------------------------------------------
# WN's cost

def wn_overhead(args, ctx: cls.Context) -> None:
    """A WN train step against the plain-conv, no-norm net's, in eager fp32; issue 2's budget is 1.15x."""
    # The baseline is WN's conv without the reparameterization: same shapes, same bias, no norm after it.
    plain = Norm(partial(conv2d, bias=True), no_norm)
    nets = {"plain convs, no norm": lambda: ResNet(norm=plain, num_classes=10, **MODELS[args.backbone_type]),
            "wn": lambda: build_model(args.backbone_type, "wn", 10)}
    x = torch.randn(args.batch_size, 3, 32, 32, device=ctx.device)
    y = torch.randint(0, 10, (args.batch_size,), device=ctx.device)
    best = {}
    for _ in range(args.rounds):  # interleaved rounds, so a drifting clock hits both alike
        for name, make in nets.items():
            torch.manual_seed(0)
            model = make().to(ctx.device)
            optimizer = torch.optim.Adam(model.parameters())
            step = partial(cls.train_step, model, optimizer, autocast=nullcontext())
            ms = measure(itertools.repeat((x, y)), step, args, ctx.device)["step (ms)"]
            best[name] = min(best.get(name, float("inf")), ms)
    print(f"{args.backbone_type}, batch {args.batch_size}, {cls.device_name(ctx.device)}, eager fp32; "
          f"best of {args.rounds} rounds of {args.steps} steps")
    print("| net | step (ms) | images/s |\n|---|---|---|")
    for name, ms in best.items():
        print(f"| {name} | {ms:.1f} | {1000 * args.batch_size / ms:.1f} |")
    print(f"wn / plain step time: {best['wn'] / best['plain convs, no norm']:.3f} (budget 1.15)")


def main(argv=None) -> None:
    parser = cls.make_parser()
    parser.add_argument("--steps", default=100, type=int, help="timed steps")
    parser.add_argument("--warmup", default=10, type=int, help="untimed steps first (compile, CUDA graphs)")
    parser.add_argument("--data_only", action="store_true", help="time the data pipelines alone")
    parser.add_argument("--wn_overhead", action="store_true", help="time WN against plain convs")
    parser.add_argument("--rounds", default=2, type=int, help="--wn_overhead: interleaved rounds")
    args = cls.parse_args(argv, parser)
    if args.data_name == "imagenet":
        parser.error("bench.py compares the CIFAR pipelines; use --data_name cifar10, cifar100 or synthetic")
    ctx = cls.setup(args)
    if args.wn_overhead:
        wn_overhead(args, ctx)
    elif args.data_only:
        print_table(data_pipelines(args, ctx), args, ctx)
    else:
        results, macs = train_pipelines(args, ctx)
        print_table(results, args, ctx, macs)


if __name__ == "__main__":
    utils.run_cli(main, "bench.py")
