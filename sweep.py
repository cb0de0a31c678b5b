"""Run a grid of cls.py configurations. Finished and diverged configurations are skipped and a stopped one
resumes, so a sweep can simply be started again after any interruption.

Examples:
    python sweep.py --backbone_type resnet18 --norm_type bn in wn --batch_size 1 2 4 8 16 32 64 128 256 --epochs 90
    python sweep.py --norm_type bn in gn wn wn_mbn --batch_size 32 --epochs 15 --jobs auto
    python sweep.py --norm_type bn wn --seed 0 1 2 --lr 1e-3 3e-3
    torchrun --nproc_per_node 4 sweep.py --data_name imagenet --norm_type bn gn --batch_size 32 64
    python sweep.py --launcher slurm --norm_type bn in gn wn wn_mbn --batch_size 32 --partition gpu  # docs/cluster.md

Every recipe flag of cls.py that takes a value takes several here; the grid is their product, one cls.py run a
point. The grid is checked whole before anything runs: a bad point stops the sweep, and points that train the
same run (one recipe, recipe.py, and one seed: --warmup_epochs 5 and 10 with --epochs 1) run once, as the sweep
says. Every other flag goes to every run unchanged. With --jobs 1 the configurations run one after another in
this process (under torchrun, each on all the processes). With --jobs N, N of them run at once, each as its own
cls.py process on the same device, with its output in its run's train.log: small batches leave most of a GPU
idle (six batch-32 runs on one H100 took 270 s together, about 100 s each alone). --jobs auto picks N from the
free GPU memory. With --launcher slurm the grid is one SLURM job array, an element a configuration
(utils/slurm.py). At its end, and with --status, the sweep writes summary.csv anew from the runs' files.
"""
from utils.cli import exit_on_ctrl_c

if __name__ == "__main__":
    exit_on_ctrl_c("sweep.py")  # before the imports below, which take seconds (flake8: E402 is meant)

import argparse
import itertools
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import cls
from model import NORMS
from recipe import PACKABLE, RECIPE_FLAGS, make_parser as cls_parser, split_runs
from utils import runtime, slurm
from utils.cli import ArgumentParser, RunDiverged, UserError, auto_or_positive_int, flag_error, run_cli
from utils.data import DATASETS, check_sizes, train_size
from utils.files import make_results_dir
from utils.record import DONE, RunRecord
from utils.results import read_results, write_summary


# GPU memory a run may take. A budget, not a measurement: ResNet-18 at batch 32 holds CIFAR-10 twice as uint8
# (0.5 GB), the weights with AdamW's state, CUDA graphs' pools and a batch-500 evaluation.
GIB_PER_RUN = 4


@dataclass
class Point:
    """One run of the grid: its values of the grid's flags, its cls.py flags parsed, and its record, to read
    (this process writes none of its files)."""
    values: dict
    args: argparse.Namespace
    record: RunRecord
    device: str  # the device type and the processes it runs on, which its recipe depends on
    world: int

    @property
    def name(self) -> str:
        return self.record.name


@dataclass
class Config:
    """What one cls.py process trains: runs of one recipe but their --seed, --lr and --weight_decay, packed
    (or one), and its command line."""
    points: list
    argv: list

    @property
    def name(self) -> str:
        return self.points[0].name + (f" and {len(self.points) - 1} more, packed" if len(self.points) > 1 else "")

    @property
    def args(self) -> argparse.Namespace:
        return self.points[0].args


def grid_actions(parser: argparse.ArgumentParser) -> list:
    """The recipe's flags that take a value; switches (--bf16, --sync_bn) pass through as one."""
    return [a for a in parser._actions if a.dest in RECIPE_FLAGS and a.option_strings and a.nargs in (None, "+")]


def make_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__)
    grid = p.add_argument_group("the grid", "cls.py's flags that define a run, each with one or more values")
    for a in grid_actions(cls_parser()):  # their types and choices, so a bad value stops the sweep here
        grid.add_argument(*a.option_strings, dest=a.dest, nargs="+", type=a.type, choices=a.choices, help=a.help)
    p.add_argument("--launcher", default="local", choices=["local", "slurm"],
                   help="local: in this process or --jobs processes; slurm: a SLURM job array (docs/cluster.md)")
    p.add_argument("--jobs", default=1, type=auto_or_positive_int, help="configurations at once, each its own process")
    p.add_argument("--status", action="store_true",
                   help="list each configuration's state, from its files and the SLURM queue; run nothing")
    slurm.add_arguments(p)
    return p


def where_runs_go(args, opts) -> tuple:
    """(device type, processes) of every run of the sweep, which its recipe depends on."""
    if args.device is not None:
        device = torch.device(args.device).type
    else:
        device = "cuda" if opts.launcher == "slurm" or torch.cuda.is_available() else "cpu"
    return device, opts.gpus_per_run * opts.nodes if opts.launcher == "slurm" else runtime.process_place()[1]


def check_against_data(args, world: int) -> None:
    """The limits the data puts on a grid point, before anything runs: --subset, --batch_size, --init_images."""
    images = train_size(args.data_name, args.data_path)
    check_sizes(args, images, world)
    if NORMS[args.norm_type].data_init and args.init_images and args.init_images > (args.subset or images):
        raise flag_error("--init_images", f"must be at most {args.subset or images}, the training images, got "
                                          f"{args.init_images}")


def parse(argv=None) -> tuple:
    """([Point], the sweep's own options, the flags every run gets). The grid is checked whole: a bad point
    stops the sweep before any run, and points that are one run (the same recipe and seed) run once, as the
    sweep says."""
    opts, rest = make_parser().parse_known_args(argv)
    if opts.launcher == "slurm":  # before the grid's checks, which may read (or download) the data
        if opts.jobs != 1:
            raise UserError("--jobs is for --launcher local; on SLURM, --array_parallelism caps the runs at once",
                            exit_code=2)
        slurm.check_cluster(opts)
    grid = {a.dest: opts.__dict__.pop(a.dest) for a in grid_actions(cls_parser())}
    grid = {flag: values for flag, values in grid.items() if values is not None}
    runs, points = {}, {}
    for values in itertools.product(*grid.values()):
        point = dict(zip(grid, values, strict=True))
        (args,) = split_runs(cls.parse_args(command([point], rest)))  # one run's: its own value of every flag
        device, world = where_runs_go(args, opts)
        check_against_data(args, world)
        run = Point(point, args, RunRecord.of_args(args, device, world), device, world)
        key = (run.record.recipe, args.seed)
        runs.setdefault(key, run)
        points.setdefault(key, []).append(values)
    for key, same in points.items():
        if len(same) > 1:
            varied = [f"--{flag} {' / '.join(map(str, dict.fromkeys(v)))}" for flag, v in zip(grid, zip(*same))
                      if len(set(v)) > 1]
            print(f"sweep.py: {len(same)} points of the grid ({', '.join(varied) or 'the same values'}) train one "
                  f"run, {runs[key].name}; it runs once", flush=True)
    return list(runs.values()), opts, rest


def command(values: list, rest: list) -> list:
    """The cls.py command line of runs with these values of the grid's flags ({flag: value} each), which
    differ at most in --seed, --lr and --weight_decay."""
    fixed = [f"--{flag}={value}" for flag, value in values[0].items() if flag not in PACKABLE]
    packed = [arg for flag in PACKABLE if flag in values[0] for arg in (f"--{flag}", *(str(v[flag]) for v in values))]
    return fixed + packed + rest + ["--resume"]


def configs(points: list, rest: list) -> list:
    """The runs not done yet, as cls.py processes: packed where --pack lets them (cls.packs), each pack of one
    recipe but --lr and --weight_decay."""
    pending, out = [p for p in points if not done(p)], []
    same = {}
    for p in pending:
        same.setdefault((p.record.recipe.key(("lr", "weight_decay")), p.device, p.world), []).append(p)
    for runs in same.values():
        num_classes = DATASETS[runs[0].args.data_name].num_classes
        out += [Config(pack, command([p.values for p in pack], rest))
                for pack in cls.packs(runs, runs[0].args, runs[0].device, num_classes)]
    return out


def auto_jobs(n_configs: int, device) -> int:
    """As many runs as fit in the free GPU memory at GIB_PER_RUN, and two host cores each (one launches
    kernels, one compiles); one on the CPU, where a run already uses every core. The free memory is read in
    a process of its own: here, CUDA would hold a context of its own for the whole sweep."""
    probe = (f"import torch; d = torch.device({device!r} or 'cuda'); "
             f"print(torch.cuda.mem_get_info(d)[0] if torch.cuda.is_available() and d.type == 'cuda' else 0)")
    free = int(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout)
    if not free:
        return 1
    return max(1, min(n_configs, free // (GIB_PER_RUN * 2**30), (os.cpu_count() or 2) // 2))


def in_process(configs: list) -> None:
    is_main = runtime.process_place()[0] == 0  # under torchrun, as cls.py: only rank 0 prints
    for i, config in enumerate(configs, 1):
        if is_main:
            print(f"[{i}/{len(configs)}] {config.name}", flush=True)
        torch._dynamo.reset()  # a fresh compile cache per configuration, below dynamo's recompile limit
        try:
            cls.main(cls.parse_args(config.argv))
        except RunDiverged as e:  # a result like any other; the next configuration is independent
            if is_main:
                print(f"sweep.py: {e}", file=sys.stderr)


def done(point: Point) -> bool:
    """Whether the run is finished or diverged, as cls.py would find it, without a process to start: refuses,
    as cls.py does, a run whose files say it was made otherwise."""
    status = point.record.status()
    if status in DONE:
        print(f"{point.name} is already {status} in {point.args.results_dir}; nothing to do", flush=True)
    return status in DONE


@dataclass
class Child:
    config: Config
    log: Path
    proc: subprocess.Popen


class Children:
    """The cls.py processes of a parallel sweep. Each runs in a process group of its own (setsid), so that
    Ctrl-C reaches it once, forwarded from here, and never twice (a second signal would stop it before its
    checkpoint)."""

    def __init__(self, jobs: int):
        self.running, self.signum = [], 0
        # Each child's share of the host's cores: torch's default of one thread per core in every child makes
        # them fight over the cores, several times slower in all than one after another.
        threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // jobs))
        self.env = {**os.environ, "OMP_NUM_THREADS": threads}

    def start(self, config: Config) -> None:
        record = config.points[0].record
        record.make_folder()  # the pack's output goes to its first run's log
        log = record.log
        with open(log, "a") as out:
            proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("cls.py")), *config.argv],
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=self.env)
        self.running.append(Child(config, log, proc))
        if self.signum:  # a signal that came while it started
            proc.send_signal(self.signum)
        print(f"started {config.name}, output in {log}", flush=True)

    def forward(self, signum, frame) -> None:
        self.signum = signum
        for child in self.running:
            child.proc.send_signal(signum)

    def wait(self) -> Child:
        """The next child to end."""
        while True:
            for child in self.running:
                if child.proc.poll() is not None:
                    self.running.remove(child)
                    return child
            time.sleep(0.2)


def in_parallel(configs: list, jobs: int) -> None:
    """Up to `jobs` runs at once. A failure stops new starts, as with --jobs 1, and the running ones finish;
    SIGINT or SIGTERM reaches every child, which saves its checkpoint, and the sweep then stops."""
    children, pending, failed = Children(jobs), list(configs), None
    previous = {s: signal.signal(s, children.forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while pending or children.running:
            while pending and len(children.running) < jobs and not (children.signum or failed):
                children.start(pending.pop(0))
            if not children.running:
                break
            child = children.wait()
            for point, status in zip(child.config.points, outcome(child, bool(children.signum)), strict=True):
                print(f"{point.name}: {status} (exit status {child.proc.returncode})", flush=True)
                if status.startswith("killed"):
                    failed = failed or f"{point.name} was {status}; its output is in {child.log}"
                elif status == "failed":
                    failed = failed or f"{point.name} failed: {last_line(child.log)}"
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if failed:
        raise UserError(failed)
    if children.signum:
        raise UserError(f"stopped by {signal.Signals(children.signum).name}; the runs saved their checkpoints: "
                        f"start the same command again to continue", exit_code=128 + children.signum)


def outcome(child: Child, stopping: bool) -> list:
    """What a child's exit means for each of its runs: finished or diverged (a result either way; cls.py exits 1
    where one of its runs diverged), stopped on the signal the sweep forwarded, killed by a signal from
    elsewhere (the OOM killer's SIGKILL), or failed."""
    code, runs = child.proc.returncode, len(child.config.points)
    if code < 0 or code >= 128:  # a signal's default action, or cls.py's own exit after saving its checkpoint
        if stopping:
            return ["stopped"] * runs
        signum = -code if code < 0 else code - 128
        return [f"killed by {signal.Signals(signum).name if signum in signal.valid_signals() else signum}"] * runs
    statuses = [point.record.status() for point in child.config.points]
    ok = code == 0 or (code == 1 and "diverged" in statuses)
    return [status if ok and status in DONE else "failed" for status in statuses]


def last_line(log: Path) -> str:
    lines = log.read_text().strip().splitlines()
    return lines[-1] if lines else f"no output, see {log}"


def index(results_dir) -> None:
    """summary.csv, derived anew from every run's files (utils/results.py); rank 0's job under torchrun."""
    if runtime.process_place()[0] == 0 and Path(results_dir).is_dir():
        runs, skipped = read_results(results_dir)
        path = write_summary(results_dir, runs)
        print(f"sweep.py: {path} lists {len(runs)} runs" + (f", {len(skipped)} left out (python report.py "
                                                              f"says why)" if skipped else ""), flush=True)


def run(configs: list, opts) -> None:
    if opts.launcher == "slurm":
        return slurm.launch(configs, opts)
    if not configs:
        return
    jobs = opts.jobs
    if jobs == "auto":
        jobs = auto_jobs(len(configs), configs[0].args.device)
    if jobs > 1 and runtime.process_place()[1] > 1:
        raise UserError("--jobs runs configurations side by side on one device; under torchrun use --jobs 1")
    if jobs == 1:
        return in_process(configs)
    runs = sum(len(c.points) for c in configs)
    print(f"sweep.py: {runs} runs in {len(configs)} processes, {jobs} at a time", flush=True)
    in_parallel(configs, jobs)


def main(argv=None) -> None:
    points, opts, rest = parse(argv)
    if opts.status:
        slurm.status(points)
        return index(points[0].args.results_dir)
    make_results_dir(points[0].args.results_dir)  # one line before any run, whatever --jobs or --launcher
    try:
        run(configs(points, rest), opts)
    finally:
        index(points[0].args.results_dir)


if __name__ == "__main__":
    run_cli(main, "sweep.py")
