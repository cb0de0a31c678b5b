"""Run a grid of cls.py configurations, one after another. Finished and diverged configurations are
skipped and a stopped one resumes, so a sweep can simply be started again after any interruption.

Examples:
    python sweep.py --backbone_type resnet18 --norm_type bn in wn --batch_size 1 2 4 8 16 32 64 128 256 --epochs 90
    python sweep.py --norm_type bn gn wn wn_mbn in --batch_size 2 32 256 --epochs 15 --data_path .data
    torchrun --nproc_per_node 4 sweep.py --data_name imagenet --norm_type bn gn --batch_size 32 64

The four grid flags take several values; every other flag is cls.py's and goes to every run unchanged.
"""
import argparse
import itertools
import os
import sys

import torch

import cls
import utils
from model import MODELS, NORMS

GRID = {"data_name": list(utils.NUM_CLASSES), "backbone_type": list(MODELS), "norm_type": list(NORMS),
        "batch_size": None}


def parse_grid(argv=None) -> tuple:
    """({flag: [values]}, the remaining arguments for cls.py)."""
    p = cls.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = cls.make_parser().parse_args([])
    for flag, choices in GRID.items():
        p.add_argument(f"--{flag}", nargs="+", default=[getattr(defaults, flag)], choices=choices,
                       type=cls.positive_int if flag == "batch_size" else str)
    grid, rest = p.parse_known_args(argv)
    return vars(grid), rest


def main(argv=None) -> None:
    grid, rest = parse_grid(argv)
    configs = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]
    is_main = int(os.environ.get("RANK", 0)) == 0  # under torchrun, as cls.py: only rank 0 prints
    for i, config in enumerate(configs, 1):
        argv = [f"--{k}={v}" for k, v in config.items()] + rest + ["--resume"]
        args = cls.parse_args(argv)  # bad flags stop the sweep here, before any run
        if is_main:
            print(f"[{i}/{len(configs)}] {utils.run_name(args)}", flush=True)
        torch._dynamo.reset()  # a fresh compile cache per configuration, below dynamo's recompile limit
        try:
            cls.main(args)
        except utils.RunDiverged as e:  # a result like any other; the next configuration is independent
            if is_main:
                print(f"sweep.py: {e}", file=sys.stderr)


if __name__ == "__main__":
    utils.run_cli(main, "sweep.py")
