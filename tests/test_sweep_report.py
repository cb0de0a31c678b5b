"""sweep.py runs a grid and skips what is finished; report.py turns the CSVs into the table and plots."""
import os
import re
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
from PIL import Image

import report
import utils
from conftest import ROOT, write_cifar


def sweep(*args, **kwargs):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "sweep.py"), "--device", "cpu", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kwargs)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """A 2x2 sweep, killed after its second configuration and started again."""
    root = tmp_path_factory.mktemp("sweep")
    data = write_cifar(root / "data", "cifar10", n_train=4, n_test=6)  # 20 train images
    results = root / "results"
    args = ["--norm_type", "bn", "in", "--batch_size", "5", "10", "--epochs", "2", "--data_path", str(data),
            "--results_dir", str(results)]
    first = sweep(*args)
    deadline = time.time() + 300
    while not ((results / "summary.csv").exists() and
               (pd.read_csv(results / "summary.csv").status == "finished").sum() >= 2):
        assert first.poll() is None and time.time() < deadline, first.communicate()[1][-2000:]
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.communicate()
    finished = {p.name: p.read_bytes() for p in results.glob("*_statistics.csv")
                if pd.read_csv(p).epoch.max() == 2}
    second = sweep(*args)
    out, err = second.communicate(timeout=300)
    assert second.returncode == 0, err[-2000:]
    return results, finished, out


def test_sweep_runs_the_grid_and_skips_finished_configurations_after_an_interruption(swept):
    results, finished, out = swept
    summary = pd.read_csv(results / "summary.csv")
    assert sorted(zip(summary.norm_type, summary.batch_size)) == [("bn", 5), ("bn", 10), ("in", 5), ("in", 10)]
    assert (summary.status == "finished").all() and (summary.epochs_done == 2).all()
    assert len(finished) >= 2 and out.count("already finished") >= 2
    for name, content in finished.items():  # skipped, not run again
        assert (results / name).read_bytes() == content


def test_report_table_equals_the_csvs_and_the_plots_are_pngs(swept):
    results, _, _ = swept
    report.main(["--results_dir", str(results)])
    text = (results / "results.md").read_text()
    summary = pd.read_csv(results / "summary.csv")
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| CIFAR10")]
    assert len(rows) == len(summary)
    for cells in rows:
        cells = [c.strip() for c in cells]
        run = summary[(summary.norm_type == {"BN": "bn", "IN": "in"}[cells[2]]) &
                      (summary.batch_size == int(cells[3]))].iloc[0]
        assert cells[4] == f"{run.params_m:.2f}" and cells[5] == utils.human(run.flops)
        assert float(cells[6]) == pytest.approx(run.best_top1, abs=0.005)
        assert float(cells[7]) == pytest.approx(run.best_top5, abs=0.005)
        assert cells[10] == "2" and cells[11] == "cpu"
    for path in [results / "top1_vs_batch_size.png", *(results / "curves").glob("*.png")]:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width >= 600 and image.height >= 300
    assert len(list((results / "curves").glob("*.png"))) == 4


def test_report_puts_the_originals_numbers_beside_ours(tmp_path):
    pd.DataFrame([{"data_name": "cifar10", "backbone_type": "resnet18", "norm_type": "in", "batch_size": 32,
                   "epochs": 90, "epochs_done": 90, "status": "finished", "params_m": 11.16, "flops": 556657152,
                   "best_top1": 91.5, "best_top5": 99.7, "final_top1": 91.2, "final_top5": 99.6, "world_size": 1,
                   "device": "NVIDIA H100 80GB HBM3"},
                  {"data_name": "cifar10", "backbone_type": "resnet18", "norm_type": "bn", "batch_size": 1,
                   "epochs": 90, "epochs_done": 3, "status": "diverged", "params_m": 11.17, "flops": 557889024,
                   "world_size": 1, "device": "cpu"}]).to_csv(tmp_path / "summary.csv", index=False)
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{report.README_MARKERS[0]}\nold\n{report.README_MARKERS[1]}\ntail\n")
    report.main(["--results_dir", str(tmp_path), "--readme", str(readme)])
    text = (tmp_path / "results.md").read_text()
    ours = r"\| ResNet18 \| IN \| 32 \| 11\.16 \| 556\.66M \| 91\.50 \| 99\.70 \| "
    assert re.search(ours + r"90\.11 \| 99\.66 \| 90 \|", text)  # then the original's row, then the epochs
    assert re.search(r"\| ResNet18 \| BN \| 1 \| .* \| diverged \| diverged \| 10\.00 \| 50\.00 \|", text)
    assert text in readme.read_text() and "old" not in readme.read_text() and readme.read_text().endswith("tail\n")


def test_architecture_png_is_drawn_by_report_py(tmp_path):
    report.main(["--architecture", str(tmp_path / "architecture.png")])
    with Image.open(tmp_path / "architecture.png") as drawn, Image.open(ROOT / "architecture.png") as committed:
        assert drawn.format == "PNG" and drawn.width >= 1200 and drawn.height >= 600
        assert drawn.size == committed.size  # the committed figure is this code's output
