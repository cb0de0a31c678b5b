"""sweep.py --launcher slurm on a one-node SLURM cluster started for these tests (conftest.py's slurm fixture):
whatever SLURM does to a job on the way, requeues, time limits, several processes, the runs end with the CSVs
of a local sweep; and a sweep that cannot be submitted says so in one line and submits nothing."""
import json
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

import sweep
from conftest import ENV, NARROW, ROOT, record_of, run_cls_here
from utils.cli import run_cli
from utils.slurm import Record
from waiting import wait_until

RECIPE = ["--batch_size", "4", "--epochs", "4"]  # on the 40 training images of conftest's `data`: 10 steps an epoch
SLURM = ["--launcher", "slurm", "--cpus_per_gpu", "1", "--poll", "0.2"]


def start(env: dict, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "sweep.py"), *NARROW, *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**ENV, **env})


def finish(proc: subprocess.Popen) -> SimpleNamespace:
    out, err = proc.communicate(timeout=300)
    return SimpleNamespace(code=proc.returncode, out=out, err=err)


def run_of(results, *args, world=1):
    """The record of the run these flags make."""
    return record_of(results, *map(str, args), world=world)


def sweep_here(capsys, *args) -> SimpleNamespace:
    """sweep.py in this process, through the same run_cli as its __main__: no interpreter to start."""
    try:
        run_cli(lambda: sweep.main([*NARROW, *map(str, args)]), "sweep.py")
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return SimpleNamespace(code=code, out=out, err=err)


@pytest.fixture
def on_slurm(slurm, monkeypatch):
    """The cluster, for sweep_here and the jobs it submits."""
    for key, value in slurm.env.items():
        monkeypatch.setenv(key, value)
    return slurm


def queued(slurm, sweep=None):
    """Whether there is still something to wait for: the sweep that submits the jobs, or a job in the queue."""
    return lambda: (sweep is not None and sweep.poll() is None) or slurm.run("squeue", "--noheader").stdout.strip()


def epochs_done(record) -> int:
    return len(pd.read_csv(record.statistics)) if record.statistics.exists() else 0


def assert_same_run(record, reference):
    """Equal CSVs apart from the seconds each epoch took."""
    a, b = (pd.read_csv(r.statistics).drop(columns="seconds") for r in (record, reference))
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    pd.testing.assert_frame_equal(pd.read_csv(record.layers_csv), pd.read_csv(reference.layers_csv), check_exact=True)


@pytest.fixture(scope="module")
def array(slurm, data, tmp_path_factory):
    """bn and in as one job array. Once bn has finished an epoch, `scontrol requeue` stops it, --status lists
    it, and Ctrl-C stops the waiting sweep; the same command, started again, waits for both to end. Meanwhile
    the same grid runs here as a local sweep (--jobs 1)."""
    results, local = tmp_path_factory.mktemp("slurm"), tmp_path_factory.mktemp("local")
    args = ["--data_path", data, "--norm_type", "bn", "in", *RECIPE]
    runs = {where: {norm: run_of(where, "--data_path", data, "--norm_type", norm, *RECIPE) for norm in ("bn", "in")}
            for where in (results, local)}
    first = start(slurm.env, *SLURM, *args, "--results_dir", results)
    wait_until(lambda: epochs_done(runs[results]["bn"]) >= 1, queued(slurm, first), what="bn's first epoch")
    job = Record(results).newest()[runs[results]["bn"].name]
    assert slurm.run("scontrol", "requeue", job.job_id).returncode == 0
    status = start(slurm.env, *SLURM, *args, "--results_dir", results, "--status")
    first.send_signal(signal.SIGINT)
    stopped = finish(first)
    queue_after_ctrl_c = slurm.run("squeue", "--noheader", "--array", "--format=%i").stdout.split()
    again = start(slurm.env, *SLURM, *args, "--results_dir", results)
    sweep.main([*NARROW, *map(str, args), "--results_dir", str(local)])
    return SimpleNamespace(results=results, local=local, runs=runs, bn=job, status=finish(status), stopped=stopped,
                           queue_after_ctrl_c=queue_after_ctrl_c, again=finish(again))


@pytest.mark.slurm
def test_a_sweep_through_slurm_ends_with_the_csvs_of_a_local_sweep(array):
    assert array.again.code == 0 and ": failed" not in array.again.out, array.again.err
    for norm in ("bn", "in"):
        assert_same_run(array.runs[array.results][norm], array.runs[array.local][norm])
        assert array.runs[array.results][norm].status() == "finished"


@pytest.mark.slurm
def test_scontrol_requeue_mid_run_continues_from_the_checkpoint(array):
    log = array.bn.log.read_text()
    assert "stopped by SIGTERM in epoch" in log and "resuming at epoch" in log, log[-3000:]
    assert log.count("finished: results in") == 1
    assert_same_run(array.runs[array.results]["bn"], array.runs[array.local]["bn"])


@pytest.mark.slurm
def test_ctrl_c_stops_the_waiting_and_leaves_the_jobs_running(array):
    stopped = array.stopped
    assert stopped.code == 128 + signal.SIGINT and "Traceback" not in stopped.err
    last = stopped.err.strip().splitlines()[-1]
    assert "stopped waiting" in last and f"scancel {array.bn.job_id}" in last
    assert array.bn.job_id in array.queue_after_ctrl_c
    bn = array.runs[array.results]["bn"].name
    assert f"{bn} is already in the queue as job {array.bn.job_id}; not submitted again" in array.again.out


@pytest.mark.slurm
def test_status_reads_each_configuration_from_its_files_and_the_queue(array):
    assert array.status.code == 0, array.status.err
    state = "(pending|requeued|completing|configuring|running)"  # as the queue has it while bn comes back
    bn = re.escape(array.runs[array.results]["bn"].name)
    assert re.search(rf"^{bn}: {state} as job {array.bn.job_id}, incomplete so far$", array.status.out, re.M), \
        array.status.out


@pytest.mark.slurm
def test_a_run_warned_before_its_time_limit_checkpoints_requeues_and_finishes_the_same(array, on_slurm, data, tmp_path,
                                                                                       capsys):
    """SLURM sends the warning (--signal=USR2@N) on its time-limit check, every 30 s, so that a real one falls
    anywhere in a window of 30 s; here it comes as SLURM sends it, to the job's steps, once an epoch is done."""
    args = ["--data_path", data, "--norm_type", "bn", *RECIPE, "--results_dir", tmp_path, "--time", "1",
            "--signal_delay", "20"]
    submitted = sweep_here(capsys, *SLURM, *args, "--no-wait")
    assert submitted.code == 0, submitted.err
    run = run_of(tmp_path, "--data_path", data, "--norm_type", "bn", *RECIPE)
    wait_until(lambda: epochs_done(run) >= 1, queued(on_slurm), what="bn's first epoch")
    job = Record(tmp_path).newest()[run.name]
    assert on_slurm.run("scancel", "--signal=USR2", job.job_id).returncode == 0
    done = sweep_here(capsys, *SLURM, *args)
    assert done.code == 0 and f"{run.name}: finished" in done.out, done.err
    log, script = job.log.read_text(), (job.log.parent / f"{job.job_id}_submission.sh").read_text()
    assert "#SBATCH --signal=USR2@20" in script and "#SBATCH --time=1" in script
    assert "stopped by SIGUSR2 in epoch" in log and f"Requeued job {job.job_id}" in log, log[-3000:]
    assert "resuming at epoch" in log
    assert_same_run(run, array.runs[array.local]["bn"])


@pytest.mark.slurm
def test_two_processes_through_slurm_match_one_process_with_the_same_global_batch(on_slurm, data, tmp_path, capsys,
                                                                                   monkeypatch):
    # As tests/test_reliability.py's torchrun test: lr 1e-4 keeps Adam's rounding chaos below the tolerance.
    common = ["--data_path", data, "--norm_type", "wn", "--epochs", "2", "--lr", "1e-4", "--init_images", "40"]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # for the two processes, which the job's two CPUs hold
    two = sweep_here(capsys, *SLURM, *common, "--batch_size", "4", "--gpus_per_run", "2", "--results_dir",
                     tmp_path / "two")
    assert two.code == 0, two.err
    status, _, err = run_cls_here(capsys, *map(str, common), "--batch_size", "8", "--results_dir",
                                  str(tmp_path / "one"))
    assert status == 0, err
    two_run = run_of(tmp_path / "two", *common, "--batch_size", "4", world=2)
    two_stats, one_stats = (pd.read_csv(r.statistics) for r in (two_run, run_of(tmp_path / "one", *common,
                                                                                 "--batch_size", "8")))
    assert json.loads(two_run.args.read_text())["recipe"]["world_size"] == 2
    for col in ("train_loss", "test_loss"):  # the gradients really are averaged over the two ranks
        assert two_stats[col].tolist() == pytest.approx(one_stats[col].tolist(), rel=1e-4)
    for col in ("test_top1", "test_top5"):
        assert two_stats[col].tolist() == one_stats[col].tolist()


@pytest.mark.slurm
def test_a_failed_job_is_named_with_its_log_and_error_and_listed_by_status(on_slurm, data, tmp_path, capsys):
    # wn's init, with every residual branch scaled by 1e308, leaves the output infinite: the run fails in its job,
    # where it is first built. bn has no such init, and finishes.
    recipe = ["--data_path", data, "--batch_size", "4", "--epochs", "2", "--residual_scale", "1e308"]
    swept = sweep_here(capsys, *SLURM, "--norm_type", "bn", "wn", *recipe, "--results_dir", tmp_path)
    status = sweep_here(capsys, *SLURM, "--norm_type", "bn", "wn", *recipe, "--results_dir", tmp_path, "--status")
    bn, wn = (run_of(tmp_path, "--norm_type", norm, *recipe).name for norm in ("bn", "wn"))
    error = (re.escape("cls.py: error: argument --residual_scale: 1e+308 leaves the network's output ") + "(inf|nan)" +
             re.escape(" after the init, before any step; use a smaller scale (auto: 1/(blocks in the stage)) (see "
                       "--help)"))
    log = Record(tmp_path).newest()[wn].log
    failed = rf"{re.escape(wn)}: failed \(job \d+_1\): {error}; log: {re.escape(str(log))}"
    assert swept.code == 1 and swept.err.strip().endswith("1 of 2 runs failed")
    assert re.search(rf"^{failed}$", swept.out, re.M) and f"{bn}: finished" in swept.out, swept.out
    assert "1 finished, 0 diverged, 1 failed" in swept.out and log.exists()
    assert status.code == 0 and status.out.splitlines()[0] == f"{bn}: finished"
    assert re.fullmatch(failed, status.out.splitlines()[1])


@pytest.mark.slurm
@pytest.mark.parametrize("flags, message", [
    (["--partition", "gpu"], "argument --partition: this cluster has no partition gpu; it has tests (see --help)"),
    (["--mem_per_gpu", "1000"], "--launcher slurm: sbatch refused the array: Memory specification can not be "
                                "satisfied; Batch job submission failed: Requested node configuration is not "
                                "available"),
])
def test_a_submission_slurm_would_refuse_is_one_line_and_submits_nothing(on_slurm, data, tmp_path, flags, message,
                                                                          capsys):
    queue = on_slurm.run("squeue", "--noheader").stdout
    r = sweep_here(capsys, *SLURM, *flags, "--data_path", data, "--results_dir", tmp_path)
    assert r.code == 2 and r.err == f"sweep.py: error: {message}\n"
    assert on_slurm.run("squeue", "--noheader").stdout == queue and list(tmp_path.glob("slurm/*")) == []


@pytest.mark.slurm
def test_an_unreachable_slurm_controller_is_one_line(slurm, tmp_path, capsys, monkeypatch):
    dead = tmp_path / "slurm.conf"  # the cluster's configuration, with nothing at the controller's port
    dead.write_text("MessageTimeout=1\n" + re.sub(r"SlurmctldPort=\d+", "SlurmctldPort=1", slurm.conf.read_text()))
    monkeypatch.setenv("SLURM_CONF", str(dead))
    r = sweep_here(capsys, *SLURM, "--results_dir", tmp_path / "results")
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1, r.err
    assert "Unable to contact slurm controller" in r.err and not (tmp_path / "results").exists()


def test_a_sweep_where_there_is_no_slurm_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))
    r = sweep_here(capsys, "--launcher", "slurm", "--results_dir", tmp_path)
    assert (r.code, r.err) == (2, "sweep.py: error: --launcher slurm: no SLURM here (sbatch is not on the PATH)\n")
