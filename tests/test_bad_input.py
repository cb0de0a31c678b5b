"""Bad input, and the siblings of each case: flags out of range, files that are not what they claim, a full disk,
and lines that mislead. Each is one line on stderr that says what is wrong and what to do, a non-zero exit, no
traceback, no temporary file left, and the files of an earlier run byte for byte as they were. Where the input is
valid after all (an architecture figure in a new folder, a run of a backbone report.py does not know), it works.
Most cases run in this process, through the scripts' own run_cli."""
import contextlib
import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading

import pytest
import torch
from PIL import Image

import bench
import cls
import report
import sweep
from conftest import NARROW, RUN, assert_clean_failure, fake_run, files_of, record_of, run_cls_here, run_here
from model import MODELS, NORMS, build_model, min_width
from utils.board import Board
from utils.cli import run_cli
from utils.progress import Progress, Totals
from utils.record import RunRecord


def flags_of(results, data):
    """The earlier run's cls.py flags."""
    return ["--data_path", str(data), *RUN, "--results_dir", str(results)]


def leftovers(folder):
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


# -----------------------------------------------------------------------------
# flags

@pytest.mark.parametrize("device,words", [
    ("meta", ["no device a run can train on", "cpu or cuda"]),
    ("mps", ["no device a run can train on", "cpu or cuda"]),
    ("cuda:x", ["must be a device name"]),
    ("cuda:99", ["CUDA"]),  # no such device here, with CUDA or without
])
def test_a_device_torch_cannot_train_on_here_is_refused_before_anything_is_written(data, earlier, capsys, tmp_path,
                                                                                   device, words):
    status, _, err = run_cls_here(capsys, "--data_path", str(data), "--results_dir", str(earlier[0]),
                                  "--device", device)
    assert_clean_failure(status, err, earlier, "--device", device, *words)
    status, _, err = run_cls_here(capsys, "--data_path", str(data), "--results_dir", str(tmp_path / "new"),
                                  "--device", device)
    assert status != 0 and not (tmp_path / "new").exists(), err  # no stray args.json, not even a folder


@pytest.mark.parametrize("seed", ["-1", "99999999999999", "4294967296"])
def test_a_seed_numpy_cannot_take_is_a_flag_error(data, earlier, capsys, seed):
    status, _, err = run_cls_here(capsys, "--data_path", str(data), "--results_dir", str(earlier[0]), "--seed", seed)
    assert_clean_failure(status, err, earlier, "--seed", "from 0 to 4294967295", f"got {seed}")
    assert status == 2


@pytest.mark.parametrize("backbone,norm,width,smallest", [("resnext50", "bn", "8", 16), ("resnext50", "sws", "15", 16),
                                                        ("resnet18", "ws_gn", "1", 2), ("resnet50", "sws", "1", 2)])
def test_a_width_too_small_for_the_network_names_the_smallest_that_works(data, earlier, capsys, backbone, norm,
                                                                         width, smallest):
    status, _, err = run_cls_here(capsys, "--data_path", str(data), "--results_dir", str(earlier[0]),
                                  "--backbone_type", backbone, "--norm_type", norm, "--width", width)
    assert_clean_failure(status, err, earlier, "--width", f"at least {smallest}", backbone, norm, f"got {width}")
    assert status == 2
    logits = build_model(backbone, norm, 10, width=smallest)(torch.randn(2, 3, 32, 32))  # the smallest works
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_every_network_works_at_its_smallest_width_and_not_below():
    x = torch.randn(2, 3, 32, 32)
    for backbone in MODELS:
        for norm in NORMS:
            smallest = min_width(backbone, norm)
            assert torch.isfinite(build_model(backbone, norm, 10, width=smallest)(x)).all(), (backbone, norm)
            if smallest > 1:
                with pytest.raises((RuntimeError, ValueError)):
                    build_model(backbone, norm, 10, width=smallest - 1)(x)


@pytest.mark.parametrize("norm,flag", [("wn", "--wn_residual_scale"), ("wn_mbn", "--residual_scale"),
                                       ("sws", "--residual_scale")])
def test_a_residual_scale_that_makes_the_init_non_finite_is_refused_before_training(data, earlier, capsys, norm,
                                                                                    flag):
    status, _, err = run_cls_here(capsys, "--data_path", str(data), "--results_dir", str(earlier[0]),
                                  "--norm_type", norm, flag, "1e308")
    assert_clean_failure(status, err, earlier, "--residual_scale", "1e+308", "before any step", "smaller")
    assert status == 2 and "--lr" not in err  # nothing recorded as diverged, and no advice about the lr


@pytest.mark.parametrize("flags,words", [
    (["--steps", "0"], ["--steps", "at least 1"]),
    (["--steps", "-1"], ["--steps", "at least 1"]),
    (["--warmup", "-1"], ["--warmup", "at least 0"]),
    (["--rounds", "0"], ["--rounds", "at least 1"]),
    (["--layer_stats_cost", "--no-layer_stats"], ["--layer_stats_cost", "--no-layer_stats"]),
])
def test_bench_flags_out_of_range(capsys, flags, words):
    status, out, err = run_here(capsys, lambda: bench.main([*NARROW, "--data_name", "synthetic", *flags]), "bench.py")
    assert status == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err and not out, err
    for word in words:
        assert word in err, err


# -----------------------------------------------------------------------------
# files the tools read

@pytest.fixture(scope="module")
def stopped(tmp_path_factory, data):
    """A run stopped by SIGTERM just after its first epoch, as a killed job leaves it: its checkpoint, its CSVs
    and its files saying incomplete. Returns its folder and its flags but --results_dir."""
    results = tmp_path_factory.mktemp("stopped")
    flags = ["--data_path", str(data), "--epochs", "2", "--batch_size", "8"]
    with pytest.MonkeyPatch.context() as m:
        end_epoch = RunRecord.end_epoch

        def then_terminate(record, *args):
            end_epoch(record, *args)
            os.kill(os.getpid(), signal.SIGTERM)  # caught by the run, which stops at its next step

        m.setattr(RunRecord, "end_epoch", then_terminate)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
            with pytest.raises(SystemExit) as stop:
                run_cli(lambda: cls.main(cls.parse_args([*NARROW, *flags, "--results_dir", str(results)])), "cls.py")
    assert stop.value.code == 128 + signal.SIGTERM, err.getvalue()
    return results, flags


@pytest.mark.parametrize("change", ["another_runs_name", "another_norms_weights", "args_not_a_dict"])
def test_a_checkpoint_that_is_not_this_runs_is_refused_in_one_short_line(stopped, tmp_path, capsys, change):
    results = tmp_path / "results"
    shutil.copytree(stopped[0], results)
    flags = [*stopped[1], "--results_dir", str(results)]
    checkpoint = record_of(results, *stopped[1]).checkpoint
    saved = torch.load(checkpoint, weights_only=False)
    wn = build_model("resnet18", "wn", 10, width=8).state_dict()  # 62 weights bn's network does not have
    other = record_of(results, *stopped[1], "--norm_type", "wn")
    if change == "another_runs_name":  # another norm's checkpoint, moved into this run's folder
        saved["head"].update(recipe=other.recipe.to_json(), name=other.name)
        saved["state"]["model"] = wn
    elif change == "another_norms_weights":  # this run's head, but another norm's network
        saved["state"]["model"] = wn
    else:
        saved["head"] = [saved["head"]]
    torch.save(saved, checkpoint)
    record_of(results, *stopped[1]).args.unlink()  # the checkpoint alone says whose it is
    before = files_of(results)
    status, _, err = run_cls_here(capsys, *flags, "--resume")
    words = {"another_runs_name": ["is another run's", other.name, "--norm_type is wn"],
             "another_norms_weights": ["does not fit this run", "model", "move it away"],
             "args_not_a_dict": ["is not a checkpoint of this tool"]}[change]
    assert_clean_failure(status, err, (results, before), str(checkpoint), *words)
    assert len(err) < 400  # not torch's list of every layer name


@pytest.mark.parametrize("content", ["42", "[1, 2]", "null", '"text"'])
@pytest.mark.parametrize("resume", [[], ["--resume"]])
def test_an_args_json_that_is_not_an_object_is_named(stopped, tmp_path, capsys, content, resume):
    results = tmp_path / "results"
    shutil.copytree(stopped[0], results)
    args = record_of(results, *stopped[1]).args  # a stopped run's: no weights, so its args.json says where it stands
    args.write_text(content)
    before = files_of(results)
    status, _, err = run_cls_here(capsys, *stopped[1], "--results_dir", str(results), *resume)
    assert_clean_failure(status, err, (results, before), str(args), "holds a JSON", "move it away or repair it")


def test_a_directory_where_the_runs_lock_belongs_is_one_line(data, earlier, capsys):
    record = record_of(earlier[0], "--data_path", str(data), "--epochs", "1")  # a new run of its own
    record.make_folder()
    record.lock.mkdir()
    before = files_of(earlier[0])
    status, _, err = run_cls_here(capsys, "--data_path", str(data), "--epochs", "1", "--results_dir", str(earlier[0]))
    assert_clean_failure(status, err, (earlier[0], before), str(record.lock), "lock", "move it away")


def test_an_empty_results_dir_is_refused(data, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where an empty folder name would write
    for prog, main in (("cls.py", lambda: cls.main(cls.parse_args([*NARROW, "--data_path", str(data),
                                                                   "--results_dir="]))),
                       ("sweep.py", lambda: sweep.main([*NARROW, "--norm_type", "bn", "in", "--data_path", str(data),
                                                        "--results_dir", ""]))):
        status, out, err = run_here(capsys, main, prog)
        assert status == 2 and "--results_dir" in err and "empty" in err and len(err.strip().splitlines()) == 1
        assert not any(tmp_path.iterdir())


# -----------------------------------------------------------------------------
# a full disk: a tmpfs of 2 MiB, which the earlier run's files (0.8 MB) share with the new run's

@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], check=True, capture_output=True)
    yield disk
    subprocess.run(["umount", "--lazy", str(disk)], check=True, capture_output=True)


def fill(disk):
    with open(disk / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError:
            pass


@pytest.mark.root
@pytest.mark.parametrize("when", ["at_the_first_checkpoint", "before_the_run", "as_it_starts", "as_it_trains"])
def test_a_full_disk_is_one_line_and_leaves_no_temporary_file(data, uninterrupted, small_disk, capsys, monkeypatch,
                                                               when):
    shutil.copytree(uninterrupted.results, small_disk, dirs_exist_ok=True)
    before = files_of(small_disk)
    if when == "before_the_run":
        fill(small_disk)
    elif when == "as_it_starts":  # args.json and TensorBoard's first events written, nothing after them
        start = RunRecord.start

        def start_then_fill(record, *args, **kwargs):
            state = start(record, *args, **kwargs)
            fill(small_disk)
            return state

        monkeypatch.setattr(RunRecord, "start", start_then_fill)
    elif when == "as_it_trains":  # TensorBoard's first events written too
        board = cls.Board.__init__

        def board_then_fill(*args, **kwargs):
            board(*args, **kwargs)
            fill(small_disk)

        monkeypatch.setattr(cls.Board, "__init__", board_then_fill)
    status, _, err = run_cls_here(capsys, "--data_path", str(data), "--norm_type", "in", "--epochs", "2",
                                  "--results_dir", str(small_disk))  # its checkpoint alone takes 2.1 MB
    assert status == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "No space left on device" in err and "free space" in err
    assert leftovers(small_disk) == []
    after = files_of(small_disk)
    assert {k: after[k] for k in before} == before
    assert not any(k.endswith(("_checkpoint.pth", ".lock")) and k not in before for k in after)


@pytest.mark.root
def test_tensorboard_on_a_full_disk_is_one_line(small_disk, capsys):
    """The writer's own thread meets the full disk first; its error comes back at the next point."""
    def main():
        progress = Progress(1, [1e-3], torch.zeros(1), torch.zeros(1), torch.zeros(()))
        with Board(small_disk / "events", True, 100, progress, {}, {"lr": 1e-3}) as board:
            fill(small_disk)
            for progress.step in range(1, 1000):
                board.step(progress, Totals([2.3], [10.0], False, 8 * progress.step), 1e-3)

    hook = threading.excepthook
    status, _, err = run_here(capsys, main, "cls.py")
    assert status == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "TensorBoard" in err and "No space left on device" in err and "--no-tensorboard" in err
    assert threading.excepthook is hook  # put back


# -----------------------------------------------------------------------------
# sweep.py, report.py

@pytest.mark.parametrize("jobs", ["1", "2"])
def test_sweep_with_a_results_dir_that_is_a_file(tmp_path, data, capsys, jobs):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    status, out, err = run_here(capsys, lambda: sweep.main([*NARROW, "--norm_type", "bn", "in", "--jobs", jobs,
                                                            "--data_path", str(data), "--results_dir", str(blocker)]),
                                "sweep.py")
    assert status == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "--results_dir" in err and str(blocker) in err and not out  # before any run starts
    assert blocker.read_text() == "x"


@pytest.mark.parametrize("readme", ["missing", "folder", "no_section"])
def test_a_readme_that_cannot_take_the_table_stops_report_before_it_writes(earlier, tmp_path, capsys, readme):
    path = {"missing": tmp_path / "README.md", "folder": tmp_path, "no_section": tmp_path / "README.md"}[readme]
    if readme == "no_section":
        path.write_text("# a README without report.py's markers\n")
    folders = sorted(p for p in earlier[0].rglob("*") if p.is_dir())
    status, _, err = run_here(capsys, lambda: report.main(["--results_dir", str(earlier[0]), "--all", "--readme",
                                                           str(path)]), "report.py")
    assert_clean_failure(status, err, earlier, str(path))
    assert sorted(p for p in earlier[0].rglob("*") if p.is_dir()) == folders  # no plots either


def test_a_summary_that_cannot_be_written_is_one_line(earlier, capsys):
    (earlier[0] / "summary.csv").mkdir()  # as root no folder is read-only: a folder in the file's place is
    before = files_of(earlier[0])
    status, _, err = run_here(capsys, lambda: report.main(["--results_dir", str(earlier[0])]), "report.py")
    assert_clean_failure(status, err, (earlier[0], before), "cannot write", "summary.csv")


def test_architecture_into_a_new_folder_works_and_a_bad_path_is_one_line(tmp_path, capsys):
    path = tmp_path / "new" / "folder" / "architecture.png"
    status, _, err = run_here(capsys, lambda: report.main(["--architecture", str(path)]), "report.py")
    assert status == 0, err
    with Image.open(path) as drawn:
        assert drawn.format == "PNG"
    (tmp_path / "a_file").write_text("x")
    for bad, words in ((tmp_path / "a_file" / "architecture.png", ["cannot make the folder", "a_file"]),
                       (tmp_path / "architecture.xyz", ["not .xyz", "png"])):
        before = files_of(tmp_path)
        status, _, err = run_here(capsys, lambda: report.main(["--architecture", str(bad)]), "report.py")
        assert_clean_failure(status, err, (tmp_path, before), *words)
    assert leftovers(tmp_path) == []


def forked(results, **values) -> None:
    """A finished run of a fork's recipe: a backbone or a norm this version lacks."""
    record = fake_run(results / "fork", ["--epochs", "3", "--seed", str(len(values))], [80.0, 85.0, 91.2])
    recipe = {**record.recipe.to_json(), **values}
    head = {**json.loads(record.args.read_text()), "recipe": recipe}
    folder = results / "_".join(map(str, values.values()))
    shutil.move(record.dir.parent, folder)
    (folder / "recipe.json").write_text(json.dumps(recipe))
    (folder / record.dir.name / "args.json").write_text(json.dumps(head))
    (folder / record.dir.name / "model.pth").unlink()


def test_report_draws_runs_of_a_backbone_and_a_norm_it_does_not_know(tmp_path, capsys):
    fake_run(tmp_path, ["--epochs", "3"], [80.0, 85.0, 91.2])
    for values in ({"norm_type": "xn"}, {"backbone_type": "resnet101"},
                   {"backbone_type": "resnet101", "norm_type": "xn", "batch_size": 64}):  # as a fork's runs
        forked(tmp_path, **values)
    shutil.rmtree(tmp_path / "fork")
    status, _, err = run_here(capsys, lambda: report.main(["--results_dir", str(tmp_path), "--min_epochs", "3"]),
                              "report.py")
    assert status == 0 and err == "", err
    table = (tmp_path / "results.md").read_text()
    assert "| resnet101 | xn | 64 |" in table and "| ResNet18 | xn | 32 |" in table
    assert "| xn (1) | BN (1) |" in (tmp_path / "comparisons.md").read_text()
    with Image.open(tmp_path / "top1_vs_batch_size.png") as drawn:
        assert drawn.format == "PNG" and drawn.width > 7 * 120  # wider than one panel: one for each backbone


# -----------------------------------------------------------------------------
# lines that mislead

def run_without_device(capsys, *flags) -> tuple:
    """cls.py as a user runs it without --device: on CUDA where there is a device, else on the CPU."""
    args = ["--width", "8", "--workers", "0", "--compile", "off", *flags]
    return run_here(capsys, lambda: cls.main(cls.parse_args(args)), "cls.py")


def test_without_device_an_error_is_one_line(data, earlier, capsys):
    status, _, err = run_without_device(capsys, "--data_path", str(data), "--subset", "41",
                                        "--results_dir", str(earlier[0]))
    assert_clean_failure(status, err, earlier, "--subset", "at most 40")


def test_a_run_without_layer_stats_names_only_the_files_it_wrote(data, tmp_path, capsys):
    status, out, err = run_without_device(capsys, "--data_path", str(data), "--epochs", "1", "--no-layer_stats",
                                          "--results_dir", str(tmp_path))
    assert status == 0 and err == "", err
    last = out.strip().splitlines()[-1]
    assert "finished" in last and "/statistics.csv" in last and "layers.csv" not in last
    assert not list(tmp_path.rglob("layers.csv"))
    notice = "notice: no CUDA device found, training on the CPU"
    assert out.count(notice) == (0 if torch.cuda.is_available() else 1)  # once, as training starts, on stdout


def test_the_continue_command_after_a_signal_is_shell_quoted_and_works(data, tmp_path, capsys, monkeypatch):
    results = tmp_path / "with space" / "it's here"
    argv = [*NARROW, "--data_path", str(data), "--epochs", "2", "--batch_size", "8", "--results_dir", str(results)]
    monkeypatch.setattr(sys, "argv", ["cls.py", *argv])
    end_epoch = RunRecord.end_epoch

    def then_interrupt(record, *args):
        end_epoch(record, *args)
        os.kill(os.getpid(), signal.SIGINT)

    with monkeypatch.context() as m:
        m.setattr(RunRecord, "end_epoch", then_interrupt)
        status, _, err = run_cls_here(capsys, *argv[len(NARROW):])
    assert status == 128 + signal.SIGINT and len(err.strip().splitlines()) == 1, err
    command = shlex.split(err.split("Continue with: ", 1)[1])
    assert command == ["python", "cls.py", *argv, "--resume"]
    status, out, err = run_here(capsys, lambda: cls.main(cls.parse_args(command[2:])), "cls.py")
    assert status == 0 and "resuming at epoch 2" in out and "finished" in out, err
