"""bench.py runs on the CPU at a tiny size and prints its tables; the numbers themselves are not judged here."""
import re

import pytest

TINY = ["--data_name", "synthetic", "--subset", "32", "--batch_size", "8", "--steps", "2", "--warmup", "1",
        "--workers", "0", "--device", "cpu"]


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
    assert "| pipeline | images/s | step (ms) | peak memory (MiB) | TFLOP/s | % of bf16 peak |" in out
    for name in ("ours", "standard"):
        (row,) = rows(out, name)
        assert float(row.split("|")[2]) > 0  # images/s
    assert re.search(r"^ours / standard images/s: \d+\.\d+x$", out, re.M)


def test_data_only_table(bench):
    out = bench("--data_only")
    assert "| pipeline | images/s | step (ms) | peak memory (MiB) |" in out
    assert len(rows(out, "ours")) == 1 and len(rows(out, "standard")) == 1


def test_wn_overhead_prints_the_ratio(bench):
    out = bench("--wn_overhead", "--rounds", "1")
    assert len(rows(out, "plain convs")) == 1 and len(rows(out, "wn")) == 1
    assert re.search(r"^wn / plain step time: \d+\.\d+ \(budget 1\.15\)$", out, re.M)
