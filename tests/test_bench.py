"""bench.py runs on the CPU at a tiny size and prints its tables; the numbers themselves are not judged here."""
import re
import subprocess
import sys

from conftest import ROOT

TINY = ["--data_name", "synthetic", "--subset", "32", "--batch_size", "8", "--steps", "2", "--warmup", "1",
        "--workers", "0", "--device", "cpu"]


def bench(*args):
    r = subprocess.run([sys.executable, str(ROOT / "bench.py"), *TINY, *args], capture_output=True, text=True,
                       timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return r.stdout


def rows(out, first):
    return [line for line in out.splitlines() if line.startswith(f"| {first}")]


def test_training_table_compares_ours_with_the_standard_pipeline():
    out = bench()
    assert "| pipeline | images/s | step (ms) | peak memory (MiB) | TFLOP/s | % of bf16 peak |" in out
    for name in ("ours", "standard"):
        (row,) = rows(out, name)
        assert float(row.split("|")[2]) > 0  # images/s
    assert re.search(r"^ours / standard images/s: \d+\.\d+x$", out, re.M)


def test_data_only_table():
    out = bench("--data_only")
    assert "| pipeline | images/s | step (ms) | peak memory (MiB) |" in out
    assert len(rows(out, "ours")) == 1 and len(rows(out, "standard")) == 1


def test_wn_overhead_prints_the_ratio():
    out = bench("--wn_overhead", "--rounds", "1")
    assert len(rows(out, "plain convs")) == 1 and len(rows(out, "wn")) == 1
    assert re.search(r"^wn / plain step time: \d+\.\d+ \(budget 1\.15\)$", out, re.M)
