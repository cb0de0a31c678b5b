"""Processes, devices, autocast, signals and RNG states: what a run sets up before it touches data."""
import argparse
import os
import random
import signal
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from utils.cli import UserError


@dataclass
class Context:
    """This process's place in the run. Every file and every print goes through is_main (rank 0)."""
    rank: int
    world: int
    device: torch.device
    autocast: object  # a context manager: bf16 autocast on CUDA, else a nullcontext
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

    @contextmanager
    def main_first(self):
        """Rank 0 runs the block before the others, e.g. to download a dataset the others then read."""
        if self.world > 1 and not self.is_main:
            dist.barrier()
        yield
        if self.world > 1 and self.is_main:
            dist.barrier()

    def main_decides(self, decide):
        """decide() on rank 0, and its answer on every rank: a question about the files, such as whether a run is
        finished, has one answer, even while rank 0 is writing them."""
        answer = [decide() if self.is_main else None]
        if self.world > 1:
            dist.broadcast_object_list(answer, src=0)
        return answer[0]

    def wrap(self, model: nn.Module, compile: str) -> nn.Module:
        """model as the train step calls it: in DDP under torchrun, and compiled where --compile asks."""
        if self.world > 1:
            model = nn.parallel.DistributedDataParallel(model, device_ids=None if self.device.type == "cpu" else
                                                        [self.device.index])
        mode = compile_mode(compile, self)
        return model if mode == "off" else torch.compile(model, mode=mode)

    def log(self, *message) -> None:
        if self.is_main:
            print(*message, flush=True)

    @property
    def device_name(self) -> str:
        return torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"


def compile_mode(compile: str, ctx: Context) -> str:
    """--compile as used. On CUDA an eager step is bound by the host launching kernels (~12 ms at batch 32 and
    at 128 on an H100), which CUDA graphs remove; the last, smaller batch of an epoch records a second graph
    once. Under DDP, graphs have crashed (pytorch/pytorch#128218), so there they wait for an explicit
    --compile reduce-overhead. On the CPU compiling costs minutes and gains little."""
    if compile != "auto":
        return compile
    return "reduce-overhead" if ctx.device.type == "cuda" and ctx.world == 1 else "off"


TRAINS_ON = ("cpu", "cuda")  # the device types a run can train on: the data, autocast and DDP are written for these


def device_name(text: str) -> str:
    """--device as argparse checks it, on any machine: a device name torch knows, of a type a run can train on.
    Whether this machine has the device, pick_device says when the run starts."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}, must be a device name: cuda, cuda:1, cpu, ...") \
            from None
    if device.type not in TRAINS_ON:
        raise argparse.ArgumentTypeError(f"{text} is no device a run can train on; use {' or '.join(TRAINS_ON)}")
    return text


def pick_device(name, local_rank: int) -> torch.device:
    """--device (checked by device_name) as a device of this machine, refused in one line before anything is
    written where the machine lacks it; without it, CUDA where there is a device, else the CPU (cls.py says so
    once training starts)."""
    if name is None:
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for CUDA, but torch sees no CUDA device; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: torch sees {torch.cuda.device_count()} CUDA device(s), numbered from 0; "
                        f"use one of them, or --device cuda")
    return torch.device("cuda", local_rank) if device.type == "cuda" and device.index is None else device


def process_place() -> tuple:
    """(rank, world size, local rank) of this process: torchrun's, or a single process's."""
    return tuple(int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))


def launcher() -> list:
    """The start of a command line that starts this process again as it was started: python, or under
    torchrun, torchrun with its number of nodes and of processes on each."""
    _, world, _ = process_place()
    if world == 1:
        return ["python"]
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    nodes = ["--nnodes", str(world // per_node)] if world > per_node else []
    return ["torchrun", *nodes, "--nproc_per_node", str(per_node)]


def setup(args) -> Context:
    """One process, or one of torchrun's: NCCL between GPUs, gloo between CPU processes."""
    rank, world, local_rank = process_place()
    device = pick_device(args.device, local_rank)
    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    if world > 1 and not dist.is_initialized():  # sweep.py runs several configurations in one process
        dist.init_process_group("nccl" if on_cuda else "gloo")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_cuda and args.bf16 else nullcontext()
    return Context(rank, world, device, autocast, torch.channels_last if on_cuda else torch.contiguous_format)


def seed(value: int) -> None:
    """python's, numpy's and torch's random generators, on every device: before a run builds its network."""
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


class Diverged(Exception):
    """A NaN or infinite loss."""


class Interrupted(Exception):
    """Raised at the loop's first safe point after a StopSignal caught a signal, with where training stood."""

    def __init__(self, progress):
        super().__init__()
        self.progress = progress


class StopSignal:
    """Within `with StopSignal() as stop:`, SIGINT, SIGTERM and SIGUSR2 (SLURM's warning before a time limit,
    utils/slurm.py) set stop.signum, which the loop polls after a step, its safe point. A second signal of the
    same kind acts at once, as usual. The handlers before it come back at the end, for callers that run several
    configurations in one process, and for submitit's, which requeues a job after USR2."""
    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)

    def __enter__(self):
        self.signum = 0
        self.previous = {s: signal.signal(s, self._catch) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc_info):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _catch(self, signum, frame):
        self.signum = signum
        signal.signal(signum, signal.SIG_DFL)


def rng_states() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(states: dict) -> None:
    """From a checkpoint loaded onto any device: torch takes its RNG states as CPU tensors only."""
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"].cpu())
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([state.cpu() for state in states["cuda"]])
