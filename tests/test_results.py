"""The report counts each run once, from the run's own files: edits, duplicates and truncations change no
published number, other data is never pooled, seeds from several commits are said so, a run that has only
started or a malformed file blocks nothing, summary.csv is derived and never read back, and the migration of
a flat results folder of an earlier version keeps every mean."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest

import report
from conftest import ROOT, fake_run, files_of, run_here
from utils.results import read_results

EPOCHS = ["--epochs", "3"]


def table_rows(text):
    return [[c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines() if line.startswith("| CIFAR10")]


def published(results, capsys):
    """(the table's rows, comparisons.md, the lines on stderr) of report.py over results."""
    status, _, err = run_here(capsys, lambda: report.main(["--results_dir", str(results), "--min_epochs", "3"]),
                              "report.py")
    assert status == 0 and "Traceback" not in err, err
    return (table_rows((results / "results.md").read_text()), (results / "comparisons.md").read_text(),
            err.strip().splitlines())


@pytest.fixture
def three_seeds(tmp_path):
    """bn and wn, seeds 0, 1 and 2, finished: the folder, the records, and their final top-1 by norm."""
    finals = {"bn": [90.0, 91.0, 92.5], "wn": [85.0, 86.5, 84.0]}
    records = {(norm, seed): fake_run(tmp_path, ["--norm_type", norm, "--seed", str(seed), *EPOCHS],
                                      [50.0, 70.0, final]) for norm, values in finals.items()
               for seed, final in enumerate(values)}
    return tmp_path, records, finals


def headline(values):
    return f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}"


def test_the_report_counts_every_run_once_from_its_own_files(three_seeds, capsys):
    results, _, finals = three_seeds
    rows, _, lines = published(results, capsys)
    assert {r[2]: (r[6], r[8]) for r in rows} == {"BN": (headline(finals["bn"]), "3"),
                                                  "WN": (headline(finals["wn"]), "3")}
    assert lines == []
    summary = pd.read_csv(results / "summary.csv")  # derived: one row per run
    assert len(summary) == 6 and sorted(summary.final_top1) == sorted(finals["bn"] + finals["wn"])


@pytest.mark.parametrize("edit", ["final_top1_cell", "duplicated_row", "rows_removed", "garbage"])
def test_an_edited_summary_changes_no_published_number(three_seeds, capsys, edit):
    results, _, _ = three_seeds
    before = published(results, capsys)
    summary = pd.read_csv(results / "summary.csv")
    if edit == "final_top1_cell":
        summary.loc[0, "final_top1"] = 99.99
    elif edit == "duplicated_row":
        summary = pd.concat([summary, summary.iloc[:1]])
    elif edit == "rows_removed":
        summary = summary.iloc[:2]
    if edit == "garbage":
        (results / "summary.csv").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff" * 20)
    else:
        summary.to_csv(results / "summary.csv", index=False)
    assert published(results, capsys) == before
    assert len(pd.read_csv(results / "summary.csv")) == 6  # written anew


def test_a_copied_run_folder_is_counted_once(three_seeds, capsys):
    results, records, finals = three_seeds
    folder = records["wn", 0].dir.parent
    shutil.copytree(folder, results / f"{folder.name}_copy")  # the same recipe.json under another name
    rows, _, lines = published(results, capsys)
    assert {r[2]: r[8] for r in rows} == {"BN": "3", "WN": "3"}
    assert len(lines) == 3 and all("a copy; counted once" in line for line in lines)


@pytest.mark.parametrize("damage,words", [
    ("truncated", "has 2 of 3 epochs"),
    ("duplicated_epoch", "not 1 to 4 once each"),
    ("non_numeric", "not a finite number"),
    ("empty", "cannot read"),
    ("differs_from_weights", "differs from the statistics its model.pth holds"),
    ("args_not_json", "cannot read"),
    ("args_another_seed", "is another run's"),
    ("args_say_incomplete", "its args.json says incomplete"),
])
def test_a_damaged_run_is_left_out_with_one_line_and_the_rest_is_reported(three_seeds, capsys, damage, words):
    results, records, finals = three_seeds
    record = records["wn", 1]
    stats = pd.read_csv(record.statistics)
    head = json.loads(record.args.read_text())
    if damage == "truncated":
        stats.iloc[:2].to_csv(record.statistics, index=False)
    elif damage == "duplicated_epoch":
        pd.concat([stats, stats.iloc[-1:]]).to_csv(record.statistics, index=False)
    elif damage == "non_numeric":
        stats.astype(object).assign(test_top1=["50", "70", "eighty"]).to_csv(record.statistics, index=False)
    elif damage == "empty":
        record.statistics.write_text("")
    elif damage == "differs_from_weights":
        stats.assign(test_top1=[50.0, 70.0, 99.0]).to_csv(record.statistics, index=False)
    elif damage == "args_not_json":
        record.args.write_text("{not json")
    else:
        changes = {"args_another_seed": {"seed": 7}, "args_say_incomplete": {"status": "incomplete"}}[damage]
        record.args.write_text(json.dumps({**head, **changes}))
    rows, _, lines = published(results, capsys)
    assert len(lines) == 1 and words in lines[0] and record.name.split("/")[0] in lines[0], lines
    left = [f for i, f in enumerate(finals["wn"]) if i != 1]
    assert {r[2]: (r[6], r[8]) for r in rows} == {"BN": (headline(finals["bn"]), "3"), "WN": (headline(left), "2")}


def test_a_run_that_has_only_started_blocks_nothing(three_seeds, capsys):
    results, records, finals = three_seeds
    started = fake_run(results, ["--norm_type", "wn", "--seed", "5", *EPOCHS], [], status="incomplete")
    under_way = fake_run(results, ["--norm_type", "wn", "--seed", "6", *EPOCHS], [40.0], status="incomplete")
    rows, _, lines = published(results, capsys)
    assert len(lines) == 1 and started.name in lines[0] and "not finished an epoch" in lines[0]
    wn = next(r for r in rows if r[2] == "WN")
    assert wn[6] == headline(finals["wn"]) and wn[8] == "3 (1 unfinished left out)"
    assert under_way.name in set(pd.read_csv(results / "summary.csv").name)


def test_seeds_on_other_data_are_never_pooled(tmp_path, capsys):
    for seed, (fingerprint, final) in enumerate([("a" * 16, 90.0), ("a" * 16, 91.0), ("b" * 16, 60.0)]):
        fake_run(tmp_path, ["--seed", str(seed), *EPOCHS], [50.0, 70.0, final], fingerprint=fingerprint)
    rows, _, _ = published(tmp_path, capsys)
    assert sorted((r[6], r[8], r[13]) for r in rows) == [("60.00", "1", f"data {'b' * 16}"),
                                                         (headline([90.0, 91.0]), "2", f"data {'a' * 16}")]


def test_a_row_whose_seeds_come_from_several_commits_says_so(tmp_path, capsys):
    for seed, commit in enumerate(["1234567" + "0" * 33, "89abcde" + "0" * 33, "89abcde" + "0" * 33]):
        fake_run(tmp_path, ["--seed", str(seed), *EPOCHS], [50.0, 70.0, 90.0], commit=commit)
    (row,) = published(tmp_path, capsys)[0]
    assert row[-1] == "1234567, 89abcde"


# -----------------------------------------------------------------------------
# migration of a flat results folder

def flatten(record, results, name) -> None:
    """The run of record as an earlier version kept it: NAME_args.json with every flag at its top level (and
    an older flag name), NAME_statistics.csv, NAME_model.pth with the args as "args"; under summary.csv."""
    import torch
    head = json.loads(record.args.read_text())
    flat = {"name": name, **head["flags"], "device": head["device"], "world_size": 1, "peak_lr": head["peak_lr"],
            "init_images_used": head["recipe"]["init_images"], "data_fingerprint": head["data_fingerprint"],
            "train_images": head["train_images"], "params": head["params"], "flops": head["flops"],
            "device_name": head["device_name"], "git_commit": head["git_commit"], "status": head["status"],
            "epochs_done": head["epochs_done"], "torch_version": head["torch_version"], "cuda_version": ""}
    flat["wn_residual_scale"] = flat.pop("residual_scale")
    (results / f"{name}_args.json").write_text(json.dumps(flat))
    shutil.copy(record.statistics, results / f"{name}_statistics.csv")
    torch.save({"model": {}, "args": flat}, results / f"{name}_model.pth")


def test_migrating_a_flat_folder_keeps_every_mean_and_n(three_seeds, tmp_path_factory, capsys):
    results, records, finals = three_seeds
    flat = tmp_path_factory.mktemp("flat")
    for (norm, seed), record in records.items():  # the old names: the seed spelled out, or hashed
        flatten(record, flat, f"cifar10_resnet18_{norm}_32_epochs3" + (f"_{seed:08x}" if seed else ""))
    pd.DataFrame([{"name": p.name, "notes": "kept"} for p in flat.glob("*_args.json")]).to_csv(flat / "summary.csv")
    status, out, err = run_here(capsys, lambda: report.main(["--results_dir", str(flat), "--migrate",
                                                             "--min_epochs", "3"]), "report.py")
    assert status == 0 and "moved 6 runs" in out and err == "", err
    assert not list(flat.glob("*_args.json")) and not list(flat.glob("*.pth"))
    assert sorted(p.parent.name for p in flat.glob("*/recipe.json")) == \
        sorted({r.dir.parent.name for r in records.values()})
    rows = table_rows((flat / "results.md").read_text())
    assert {r[2]: (r[6], r[8]) for r in rows} == {"BN": (headline(finals["bn"]), "3"),
                                                  "WN": (headline(finals["wn"]), "3")}
    published(results, capsys)
    assert (flat / "results.md").read_text() == (results / "results.md").read_text()
    assert pd.read_csv(flat / "summary-before-migration.csv").notes.tolist() == ["kept"] * 6
    for (norm, seed), record in records.items():  # each run in its folder, its files agreeing with the original's
        moved = json.loads((flat / record.name / "args.json").read_text())
        assert moved["recipe"] == record.recipe.to_json() and moved["seed"] == seed
        assert (flat / record.name / "statistics.csv").read_bytes() == record.statistics.read_bytes()


def test_a_run_still_training_is_not_migrated(tmp_path_factory, three_seeds, capsys):
    import fcntl
    _, records, _ = three_seeds
    flat = tmp_path_factory.mktemp("flat")
    flatten(records["bn", 0], flat, "cifar10_resnet18_bn_32_epochs3")
    before = files_of(flat)
    with open(flat / ".cifar10_resnet18_bn_32_epochs3.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        status, out, err = run_here(capsys, lambda: report.main(["--results_dir", str(flat), "--migrate"]),
                                    "report.py")
    assert status == 1 and "being trained" in err and "moved 0 runs" in out  # and then no runs to report
    assert {k: v for k, v in files_of(flat).items() if not k.startswith(".")} == before


def test_the_committed_cpu_example_reads_whole_and_its_table_is_its_runs_means():
    results = ROOT / "results" / "cpu-example"
    runs, skipped = read_results(results)
    assert skipped == [] and len(runs) == 70 and (runs.status == "finished").all()
    seeds = {}
    for _, run in runs.iterrows():
        seeds.setdefault(run.recipe, []).append(run.seed)
    assert len(seeds) == 14 and all(sorted(s) == [0, 1, 2, 3, 4] for s in seeds.values())  # every recipe at 5 seeds
    table = {(r[2], r[3]): r[6] for r in table_rows((results / "results.md").read_text())}
    for (norm, batch), finals in runs.groupby(["norm_type", "batch_size"]).final_top1:
        label = {"bn": "BN", "in": "IN", "gn": "GN", "wn": "WN", "wn_mbn": "WN+MBN", "ws_gn": "WS+GN", "sws": "SWS"}
        assert table[label[norm], str(batch)] == headline(finals.tolist())
