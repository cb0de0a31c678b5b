"""Benchmarks that print numbers. Speed targets are checked here, never by timed tests.

    python bench.py wn_overhead                  # WN ResNet-18 train step vs the same net with plain convs
    python bench.py wn_overhead --batch_size 128 --device cuda
"""
import argparse
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import MODELS, Norm, ResNet, build_model, no_norm


def plain_conv(in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """WN's conv without the reparameterization: same shapes, same bias, no norm after it."""
    return nn.Conv2d(in_ch, out_ch, kernel_size, stride, kernel_size // 2, groups=groups, bias=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_seconds(model: nn.Module, batch_size: int, image_size: int, device: torch.device, steps: int) -> list:
    """Wall time of each of `steps` full train steps (forward, backward, Adam), after 3 warm-up steps."""
    model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(batch_size, 3, image_size, image_size, device=device)
    y = torch.randint(0, 10, (batch_size,), device=device)
    times = []
    for i in range(steps + 3):
        sync(device)
        start = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sync(device)
        times.append(time.perf_counter() - start)
    return times[3:]


def wn_overhead(args) -> None:
    """Issue 2's budget: a WN ResNet-18 train step costs at most 1.15x the plain-conv, no-norm step."""
    nets = {"plain": lambda: ResNet(norm=Norm(plain_conv, no_norm), num_classes=10, **MODELS[args.backbone_type]),
            "wn": lambda: build_model(args.backbone_type, "wn", 10)}
    medians = {}
    for round_ in range(args.rounds):  # interleaved rounds, so drifting clocks hit both alike
        for name, make in nets.items():
            torch.manual_seed(0)
            times = step_seconds(make(), args.batch_size, 32, args.device, args.steps)
            medians.setdefault(name, []).append(statistics.median(times))
    plain, wn = (min(medians[k]) for k in ("plain", "wn"))
    print(f"{args.backbone_type}, batch {args.batch_size}, {args.device}, "
          f"median train step over {args.steps} steps, best of {args.rounds} rounds")
    print(f"| net | step (ms) | images/s |\n|---|---|---|")
    for name, t in (("plain convs, no norm", plain), ("wn", wn)):
        print(f"| {name} | {1000 * t:.1f} | {args.batch_size / t:.1f} |")
    print(f"wn / plain step time: {wn / plain:.3f} (budget 1.15)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["wn_overhead"])
    p.add_argument("--backbone_type", default="resnet18", choices=list(MODELS))
    p.add_argument("--batch_size", default=32, type=int)
    p.add_argument("--steps", default=10, type=int)
    p.add_argument("--rounds", default=2, type=int)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", type=torch.device)
    args = p.parse_args(argv)
    {"wn_overhead": wn_overhead}[args.what](args)


if __name__ == "__main__":
    main()
