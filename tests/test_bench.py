"""bench.py runs on the CPU at a tiny size and prints its tables; the numbers themselves are not judged here."""
import re

import pytest

TINY = ["--data_name", "synthetic", "--subset", "32", "--batch_size", "8", "--steps", "2", "--warmup", "1",
        "--workers", "0", "--device", "cpu", "--width", "8", "--init_images", "32"]


@pytest.fixture
def bench(capsys):
    """bench.py's output for TINY plus more flags, run in this process."""
    def run(*args):
        import bench as script
        script.main([*TINY, *args])
        return capsys.readouterr().out
    return run


def rows(out, first):
    return [line for line in out.splitlines() if line.startswith(f"| {first}")]


def test_training_table_compares_ours_with_the_standard_pipeline(bench):
    out = bench()
    assert ("| pipeline | images/s | step (ms) | peak memory (MiB) | TFLOP/s | % of bf16 peak | 90 epochs (h:mm:ss) |"
            in out)
    for name in ("ours", "standard"):
        (row,) = rows(out, name)
        cells = [c.strip() for c in row.split("|")[1:-1]]
        assert float(cells[1]) > 0  # images/s
        hours, minutes, seconds = map(int, cells[6].split(":"))  # 90 x 50,000 images at that rate
        assert 3600 * hours + 60 * minutes + seconds == pytest.approx(4.5e6 / float(cells[1]), rel=1e-3, abs=1)
    assert re.search(r"^ours / standard images/s: \d+\.\d+x$", out, re.M)


def test_data_only_table(bench):
    out = bench("--data_only")
    assert "| pipeline | images/s | step (ms) | peak memory (MiB) |" in out
    assert len(rows(out, "ours")) == 1 and len(rows(out, "standard")) == 1


def test_norms_against_the_first_as_cls_trains_them(bench):
    out = bench("--norms", "bn", "wn", "--rounds", "1")
    assert len(rows(out, "bn")) == 1 and len(rows(out, "wn")) == 1 and "compile=off" in out
    assert re.search(r"^wn / bn step time: \d+\.\d+ \(budget 1\.15\)$", out, re.M)


def test_wn_overhead_prints_the_ratio(bench):
    out = bench("--wn_overhead", "--rounds", "1")
    assert len(rows(out, "plain convs")) == 1 and len(rows(out, "wn")) == 1
    assert re.search(r"^wn / plain convs, no norm step time: \d+\.\d+ \(budget 1\.15\)$", out, re.M)


def test_layer_stats_cost_is_a_share_of_an_epoch(bench):
    out = bench("--layer_stats_cost", "--rounds", "1")
    # --subset 32: the probe batch is every training image there is, not 128
    assert re.search(r"the layer statistics \(32 probe images\) [\d.]+ ms, [\d.]+% of it \(budget 2%\)$", out, re.M)


def test_tensorboard_cost_is_a_share_of_an_epoch(bench):
    out = bench("--tensorboard_cost", "--rounds", "1")
    # batch 8: 6250 steps an epoch, a host sync every 25
    assert re.search(r"TensorBoard's 250 points and the epoch's end \(\d+ layer rows\) [\d.]+ ms, [\d.]+% of it, "
                     r"\d+ KiB of events$", out, re.M)
