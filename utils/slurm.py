"""sweep.py --launcher slurm: the grid as one SLURM job array, submitted through submitit, an element a
configuration. An element runs cls.py with --resume in the job's own processes, one per GPU on each of its
nodes (one DDP run, ranks and rendezvous from SLURM's environment), so that a requeued element continues from
its checkpoint and a finished one is skipped.

Time limits and preemption: SLURM sends USR2 --signal_delay seconds before a job's time limit (sbatch
--signal=USR2@N), and before preempting it where the cluster is set up so. cls.py saves its checkpoint at the
next step and stops; the element hands the signal on to submitit's handler, which requeues the job (at most
--max_requeues times for time limits). A job requeued by anything else (scontrol requeue, a preemption that
requeues) gets SIGTERM, which cls.py answers the same way.

The queue is read with squeue, and each run's outcome from its own files: on a cluster without accounting,
sacct, which submitit's job states come from, knows nothing.

No torch at the top of this module: a job unpickles Element, and so imports this module, before submitit sets
its USR2 handler, and a USR2 in that window would end the job.
"""
import argparse
import contextlib
import csv
import io
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import submitit
from submitit.core.utils import FailedJobError, FailedSubmissionError

from utils.cli import UserError, flag_error, natural_int, positive_float, positive_int

ROOT = Path(__file__).resolve().parents[1]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("--launcher slurm", "the resources of one run (an element of the job array), "
                                                       "and how the sweep follows the array")
    g.add_argument("--gpus_per_run", default=1, type=positive_int,
                   help="GPUs on each node of a run, a process each; with --device cpu, that many CPU processes "
                        "and no GPU")
    g.add_argument("--nodes", default=1, type=positive_int, help="nodes of a run")
    g.add_argument("--cpus_per_gpu", default=None, type=positive_int, help="CPUs of each process (default: the "
                                                                           "cluster's)")
    g.add_argument("--mem_per_gpu", default=None, type=positive_float,
                   help="GB of host memory for each process (default: the cluster's)")
    g.add_argument("--time", default=1440, type=positive_int,
                   help="minutes a job may run; a run that needs longer checkpoints and requeues")
    g.add_argument("--partition", default=None, help="default: the cluster's")
    g.add_argument("--account", default=None, help="default: yours")
    g.add_argument("--qos", default=None, help="quality of service")
    g.add_argument("--constraint", default=None, help="node features, as sbatch --constraint")
    g.add_argument("--array_parallelism", default=None, type=positive_int, help="runs at once at most (default: "
                                                                                  "all)")
    g.add_argument("--sbatch", default=[], action="append", type=sbatch_option, metavar="KEY[=VALUE]",
                   help="any other sbatch option, e.g. --sbatch mail-type=END; once per option")
    g.add_argument("--max_requeues", default=10, type=natural_int,
                   help="requeues of a job that reaches its time limit; preemptions do not count")
    g.add_argument("--signal_delay", default=90, type=positive_int,
                   help="seconds before the time limit that SLURM warns a job (USR2), time for a checkpoint")
    g.add_argument("--wait", default=True, action=argparse.BooleanOptionalAction,
                   help="wait for the array, a line as each run ends; --no-wait: submit and return")
    g.add_argument("--poll", default=30, type=positive_float, help="seconds between looks at the queue")


def sbatch_option(text: str) -> tuple:
    key, sep, value = text.partition("=")
    return key.lstrip("-"), value if sep else True


# -----------------------------------------------------------------------------
# in the job

class Element(submitit.helpers.Checkpointable):
    """One configuration's cls.py run, in one process of the job. Checkpointable: at the time limit submitit
    requeues it with the same argv, and its --resume continues from the checkpoint."""

    def __call__(self, argv: list) -> None:
        env = submitit.JobEnvironment()
        if env.num_tasks > 1:  # what torchrun would set, for runtime.process_place and init_process_group
            os.environ.update(RANK=str(env.global_rank), LOCAL_RANK=str(env.local_rank),
                              WORLD_SIZE=str(env.num_tasks), MASTER_ADDR=env.hostnames[0],
                              MASTER_PORT=str(20000 + int(env.raw_job_id) % 20000))
        sys.argv = [str(ROOT / "cls.py"), *argv]  # the command cls.py's messages show
        import cls  # here, not at the top: see the module's docstring
        from utils.cli import run_cli
        try:
            run_cli(lambda: cls.main(cls.parse_args(argv)), "cls.py")
        except SystemExit as e:
            if e.code != 128 + signal.SIGUSR2:
                raise
            # Stopped at SLURM's warning with the checkpoint saved. submitit's handler, back in place, requeues the
            # job from rank 0 and exits, or raises once --max_requeues is spent. The other ranks end quietly: a
            # failed task can make srun (KillOnBadExit) kill rank 0 before it has requeued the job. The requeue
            # sends SIGTERM to every process of the job, the `scontrol requeue` that asked for it too, which then
            # fails the handler at random; ignored here, SIGTERM is ignored in scontrol, which inherits that.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.raise_signal(signal.SIGUSR2)


# -----------------------------------------------------------------------------
# in sweep.py

@dataclass
class Job:
    """A configuration's newest array element: the job id squeue shows (123_4) and its log."""
    name: str
    job_id: str
    log: Path


class Record:
    """{results_dir}/slurm/jobs.csv: the name, job id and log of every configuration submitted, newest last,
    so that the same grid's --status and a later sweep find its jobs."""

    def __init__(self, results_dir):
        self.path = Path(results_dir).resolve() / "slurm" / "jobs.csv"

    def add(self, jobs: list) -> None:
        new = not self.path.exists()
        with open(self.path, "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["name", "job_id", "log"])
            writer.writerows([job.name, job.job_id, job.log] for job in jobs)

    def newest(self) -> dict:
        if not self.path.exists():
            return {}
        with open(self.path, newline="") as f:
            return {row["name"]: Job(row["name"], row["job_id"], Path(row["log"])) for row in csv.DictReader(f)}


def command(*args: str) -> str:
    """A SLURM command's output; one line, status 2, when it fails."""
    try:
        r = subprocess.run(args, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UserError(f"--launcher slurm: {args[0]} failed: {e}", exit_code=2) from None
    if r.returncode:
        raise UserError(f"--launcher slurm: {' '.join(args)} failed: {last_line(r.stderr)}", exit_code=2)
    return r.stdout


def check_cluster(opts) -> None:
    """Before anything is submitted: a controller that answers, and the partition asked for."""
    if shutil.which("sbatch") is None:
        raise UserError("--launcher slurm: no SLURM here (sbatch is not on the PATH)", exit_code=2)
    partitions = command("sinfo", "--noheader", "--format=%R").split()
    if opts.partition is not None and opts.partition not in partitions:
        raise flag_error("--partition", f"this cluster has no partition {opts.partition}; it has "
                                        f"{', '.join(sorted(set(partitions)))}")


def in_queue() -> dict:
    """{job id: state} of your jobs that squeue lists (pending, running, completing, ...), an array's elements
    each on its own (123_4)."""
    lines = command("squeue", "--me", "--noheader", "--array", "--format=%i %T").splitlines()
    return dict(line.split() for line in lines if line.strip())


def sbatch_parameters(opts, n_configs: int, on_cpu: bool) -> dict:
    procs = opts.gpus_per_run
    params = dict(job_name="sweep", nodes=opts.nodes, ntasks_per_node=procs, time=opts.time,
                  signal_delay_s=opts.signal_delay, array_parallelism=opts.array_parallelism or n_configs,
                  stderr_to_stdout=True, additional_parameters={"requeue": True, **dict(opts.sbatch)},
                  # the job unpickles Element from this checkout, wherever sweep.py was started from
                  setup=[f"export PYTHONPATH={shlex.quote(str(ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}"])
    if not on_cpu:
        params["gpus_per_node"] = procs
    if opts.cpus_per_gpu:
        params["cpus_per_task"] = opts.cpus_per_gpu
    if opts.mem_per_gpu:
        params["mem"] = f"{round(opts.mem_per_gpu * procs * 1024)}M"  # per node
    params.update({k: getattr(opts, k) for k in ("partition", "account", "qos", "constraint") if getattr(opts, k)})
    return params


def submit(configs: list, opts, record: Record) -> list:
    """The configurations as one job array (a single job for one), its logs in a folder of its own."""
    folder = record.path.parent / time.strftime("%Y%m%d-%H%M%S")
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=opts.max_requeues)
    executor.update_parameters(**sbatch_parameters(opts, len(configs), configs[0].args.device == "cpu"))
    conf = {k: os.environ[k] for k in ["SLURM_CONF"] if k in os.environ}  # the cluster's, not an allocation's
    try:  # sbatch's errors come in e, and not also on stderr, where submitit would copy them
        with submitit.helpers.clean_env(), submitit.helpers.environment_variables(**conf), \
                contextlib.redirect_stderr(io.StringIO()):
            jobs = executor.map_array(Element(), [config.argv for config in configs])
    except (FailedJobError, FailedSubmissionError) as e:
        shutil.rmtree(folder, ignore_errors=True)
        errors = [line.removeprefix("sbatch: error: ") for line in str(e).strip().splitlines()]
        raise UserError(f"--launcher slurm: sbatch refused the array: {'; '.join(errors)}", exit_code=2) from None
    submitted = [Job(point.name, job.job_id, job.paths.stdout) for config, job in zip(configs, jobs, strict=True)
                 for point in config.points]  # a packed job: a row for each of its runs
    record.add(submitted)
    what = f"{len(jobs)} configurations as job array" if len(jobs) > 1 else "1 configuration as job"
    print(f"submitted {what} {jobs[0].job_id.split('_')[0]}, logs in {folder}", flush=True)
    return submitted


def launch(configs: list, opts) -> None:
    """Submit the configurations not already in the queue; then, unless --no-wait, follow them to the end."""
    if not configs:
        return print("nothing to submit", flush=True)
    record, queue = Record(configs[0].args.results_dir), in_queue()
    newest = {name: job for name, job in record.newest().items() if job.job_id in queue}
    queued = [config for config in configs if all(point.name in newest for point in config.points)]
    for config in queued:
        print(f"{config.name} is already in the queue as job {newest[config.points[0].name].job_id}; not "
              f"submitted again", flush=True)
    todo = [config for config in configs if config not in queued]
    jobs = (submit(todo, opts, record) if todo else []) + [newest[point.name] for c in queued for point in c.points]
    if not opts.wait:
        ids = " ".join(sorted({job.job_id.split("_")[0] for job in jobs}))
        return print(f"follow them with the same command and --status, or squeue; cancel them with: scancel {ids}")
    wait(jobs, {point.name: point for config in configs for point in config.points}, opts.poll)


def wait(jobs: list, runs: dict, poll: float) -> None:
    """A line as each job leaves the queue, with the outcome of each run it trained; the counts at the end,
    status 1 if any failed. Ctrl-C stops the waiting only: the jobs go on. jobs: a Job a run."""
    left, counts = list(jobs), Counter()
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        while left:
            queue = in_queue()
            for job in [job for job in left if job.job_id not in queue]:
                left.remove(job)
                outcome = outcome_of(runs[job.name])
                counts[outcome] += 1
                failure = f" (job {job.job_id}): {last_line(job.log)}; log: {job.log}" if outcome == "failed" else ""
                print(f"{job.name}: {outcome}{failure}", flush=True)
            if left:
                time.sleep(poll)
    except KeyboardInterrupt:
        raise UserError(f"stopped waiting; the {len(left)} jobs left go on. Follow them with the same command and "
                        f"--status, or squeue; cancel them with: scancel {' '.join(j.job_id for j in left)}",
                        exit_code=128 + signal.SIGINT) from None
    finally:
        signal.signal(signal.SIGINT, previous)
    print(f"sweep.py: {counts['finished']} finished, {counts['diverged']} diverged, {counts['failed']} failed",
          flush=True)
    if counts["failed"]:
        raise UserError(f"{counts['failed']} of {len(jobs)} runs failed")


def outcome_of(run) -> str:
    """finished or diverged, as the run's files say; else failed: its job ended without a result."""
    from utils.record import DONE  # not at the top: see the module's docstring
    status = run.record.status()
    return status if status in DONE else "failed"


def status(runs: list) -> None:
    """Each run's state, from its files and, where it was submitted, from the queue."""
    from utils.record import DONE  # not at the top: see the module's docstring
    jobs = Record(runs[0].args.results_dir).newest()
    queue = in_queue() if any(run.name in jobs for run in runs) else {}
    for run in runs:
        files, job = run.record.status(), jobs.get(run.name)
        if job and job.job_id in queue:
            state = f"{queue[job.job_id].lower()} as job {job.job_id}" + (f", {files} so far" if files else "")
        elif files in DONE:
            state = files
        elif job:
            state = f"failed (job {job.job_id}): {last_line(job.log)}; log: {job.log}"
        else:
            state = f"{files}, not in the queue" if files else "not submitted"
        print(f"{run.name}: {state}", flush=True)


def last_line(text_or_log) -> str:
    """The last line of a message or a log that is not srun's, slurmstepd's or submitit's log: the error, for a
    failure (a traceback's last line, or cls.py's one line)."""
    if isinstance(text_or_log, Path):
        try:
            text_or_log = text_or_log.read_text(errors="replace")
        except OSError as e:
            return f"no log ({e.strerror})"
    lines = [line.strip() for line in text_or_log.splitlines()
             if line.strip() and not line.startswith(("srun: ", "slurmstepd", "submitit "))]
    return lines[-1] if lines else "nothing"
