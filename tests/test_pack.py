"""Packing: the runs of a pack, trained as one network, are their separate runs. Each member starts from its own
seed's init, sees its own data order and augmentation, has its own lr, decay, schedule and init, and writes
its own folder; it ends where its separate run ends (in float64 to 1e-6; in float32 its gradient is the exact
one to 1e-4); a member that diverges is frozen and the others go on unchanged; a pack resumes, and a
finished member is never trained again."""
import argparse
import copy
import dataclasses
import json
import os
import signal
import subprocess
import sys
from contextlib import contextmanager

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import cls
from conftest import ENV, NARROW, ROOT, files_of, one_run, record_of, run_cls_here, write_cifar
from model import NORMS, counts
from recipe import Context, Recipe
from utils import runtime
from utils.cli import UserError
from utils.data import build_loaders
from utils.pack import MOST, Member, Pack, PackedLoader, PackedNet, pack_size
from utils.record import RunRecord

SHORT = ["--epochs", "2", "--batch_size", "8", "--init_images", "40"]  # 40 images: 5 steps an epoch
CPU = runtime.Context(0, 1, torch.device("cpu"), torch.autocast("cpu", enabled=False), torch.contiguous_format)


@pytest.fixture
def float64():
    """Every tensor the runs make in float64, as their default dtype: the data, the networks, the sums."""
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def statistics(record) -> pd.DataFrame:
    return pd.read_csv(record.statistics).drop(columns="seconds")


def tensors(saved):
    """Every tensor in a saved object, however deep in its dicts and lists."""
    if isinstance(saved, torch.Tensor):
        yield saved
    elif isinstance(saved, (dict, list, tuple)):
        for value in saved.values() if isinstance(saved, dict) else saved:
            yield from tensors(value)


def assert_close(a: pd.DataFrame, b: pd.DataFrame, rtol: float) -> None:
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=rtol, atol=1e-9)


# -----------------------------------------------------------------------------
# a member is its separate run

@pytest.mark.parametrize("norm", list(NORMS))
def test_in_float64_every_member_ends_where_its_separate_run_ends(tmp_path, data, capsys, float64, norm):
    flags = ["--data_path", str(data), "--norm_type", norm, *SHORT]
    packed = ["--seed", "0", "1", "2", "--lr", "1e-3", "3e-3", "1e-3", "--weight_decay", "0.05", "0.05", "0.1"]
    status, _, err = run_cls_here(capsys, *flags, *packed, "--pack", "3", "--keep_checkpoint", "--results_dir",
                                  str(tmp_path / "pack"))
    assert status == 0, err
    losses = []
    for seed, lr, decay in (("0", "1e-3", "0.05"), ("1", "3e-3", "0.05"), ("2", "1e-3", "0.1")):
        alone = [*flags, "--seed", seed, "--lr", lr, "--weight_decay", decay]
        status, _, err = run_cls_here(capsys, *alone, "--results_dir", str(tmp_path / "alone"))
        assert status == 0, err
        member, separate = record_of(tmp_path / "pack", *alone), record_of(tmp_path / "alone", *alone)
        assert_close(statistics(member), statistics(separate), rtol=1e-6)
        assert_close(pd.read_csv(member.layers_csv), pd.read_csv(separate.layers_csv), rtol=1e-6)
        head = json.loads(member.args.read_text())
        assert len(head["pack"]) == 3 and member.name in head["pack"] and head["recipe"]["lr"] == float(lr)
        for saved in (member.weights, member.checkpoint):  # its own tensors, not views of the whole pack's
            for t in tensors(torch.load(saved, weights_only=False)):
                assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), saved
        losses.append(statistics(member).train_loss.iloc[0])
    assert len(set(losses)) == 3  # really the members' own runs


def members_of(norm: str, data, seeds=(0, 1, 2)) -> list:
    """cls.build's runs of these seeds, as a pack builds them, with their own loaders. Width 16: at width 8,
    ws_gn's GroupNorm has single-channel groups on small maps, whose float32 gradient is so ill-conditioned
    that a separate run's own changes by 5% between the contiguous and the channels_last layout (4e-6 at 16)."""
    args = one_run(*NARROW, "--width", "16", "--data_path", str(data), "--norm_type", norm, *SHORT)
    recipe = Recipe.resolve(args, Context("cpu", 1, 40))
    shared = build_loaders(args, CPU)
    out = []
    for seed in seeds:
        mine = dataclasses.replace(shared, train=shared.train.reseeded(seed))
        out.append((cls.build(recipe, argparse.Namespace(**{**vars(args), "seed": seed}), CPU, mine), mine))
    return out


def pack_of(built: list) -> Pack:
    """A pack of members_of's runs, each with its own loader."""
    net = PackedNet([run.model for run, _ in built])
    return Pack([Member(None, None, run) for run, _ in built], net, net, PackedLoader([d.train for _, d in built]),
                torch.ones(len(built), dtype=torch.bool))


@contextmanager
def relu_masks(model: nn.Module):
    """The list, filled by model's forwards, of each ReLU call's output > 0, in the order of the calls."""
    masks = []
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    hooks = [m.register_forward_hook(lambda m, inputs, out: masks.append(out.detach() > 0)) for m in relus]
    try:
        yield masks
    finally:
        for hook in hooks:
            hook.remove()


def exact_gradient(model: nn.Module, x, y, masks: list) -> list:
    """model's gradient on (x, y) in float64, each ReLU call passing where `masks` say: a float32 forward's. A
    ReLU input within rounding of 0 has one sign in float32 and may have the other in float64 (or in float32
    summed in another order); that one switch moved the gradient of the layers before it by 5e-3 to 1e-2 of
    its norm here. Given float32's switches, the exact gradient is the one float32 approximates."""
    exact, calls, before = copy.deepcopy(model).double(), iter(masks), {}
    relus = [m for m in exact.modules() if isinstance(m, nn.ReLU)]
    hooks = [m.register_forward_pre_hook(lambda m, inputs: before.__setitem__(m, inputs[0].clone())) for m in relus]
    hooks += [m.register_forward_hook(lambda m, inputs, out: before.pop(m) * next(calls)) for m in relus]
    F.cross_entropy(exact(x.double()), y).backward()
    for hook in hooks:
        hook.remove()
    return [p.grad for p in exact.parameters()]


# Against the exact gradient, rounding alone measured up to 8.1e-6 of a tensor's norm (wn_mbn's stem g, in a
# separate run; 6.0e-6 in a packed member). A member given another's gradient, or the wrong share of the loss,
# would be off by about 1.
FLOAT32_GRADIENT = 1e-4


def relative_error(a: torch.Tensor, exact: torch.Tensor) -> float:
    return (torch.linalg.vector_norm(a.double() - exact) / torch.linalg.vector_norm(exact)).item()


def own_channels(masks: list, k: int, members: int) -> list:
    return [m.view(len(m), members, -1, *m.shape[2:])[:, k] for m in masks]


@pytest.mark.parametrize("norm", list(NORMS))
def test_in_float32_the_init_is_bit_identical_and_the_gradient_exact_to_rounding(data, norm):
    """The weights after the first step are not compared in float32: Adam's first step is lr g / (|g| + eps) an
    element, about lr sign(g), so an element whose gradient is within rounding of 0 moves a whole step one way
    in the member and the other in its separate run, which measured up to 1.9e-4 of a tensor's norm. Each
    member's gradient is checked against the exact one instead, and its whole trajectory in float64 above."""
    packed, alone = members_of(norm, data), members_of(norm, data)
    for (a, _), (b, _) in zip(packed, alone):
        for (name, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values()):
            assert torch.equal(p, q), name  # the init, WN's data-dependent one on its own batch included
    before = [copy.deepcopy(run.model) for run, _ in packed]
    pack = pack_of(packed)
    pack.loader.set_epoch(1)
    x, y = next(iter(pack.loader))
    with relu_masks(pack.net) as masks:
        losses, _ = cls.train_step(pack, x, y, CPU.autocast)
    for k, (run, data_k) in enumerate(alone):
        data_k.train.set_epoch(1)
        xk, yk = next(iter(data_k.train))
        assert torch.equal(xk, x[:, 3 * k:3 * k + 3]) and torch.equal(yk, y[:, k])  # its own order and crops
        with relu_masks(run.model) as own:
            loss, _ = cls.train_step(pack_of([(run, data_k)]), xk, yk[:, None], CPU.autocast)
        assert losses[k].item() == pytest.approx(loss.item(), rel=1e-6)
        member = packed[k][0].model
        exact = exact_gradient(before[k], xk, yk, own_channels(masks, k, len(packed)))
        for (name, p), r in zip(member.named_parameters(), exact):
            assert relative_error(p.grad, r) <= FLOAT32_GRADIENT, (norm, k, name)
        exact = exact_gradient(before[k], xk, yk, own)
        for (name, q), r in zip(run.model.named_parameters(), exact):
            assert relative_error(q.grad, r) <= FLOAT32_GRADIENT, (norm, k, name)  # the separate run's too


# -----------------------------------------------------------------------------
# divergence, resume, and a finished member

def test_a_member_that_diverges_is_frozen_and_the_others_go_on_unchanged(tmp_path, data, capsys, float64):
    flags = ["--data_path", str(data), *SHORT, "--warmup_epochs", "0"]
    status, _, err = run_cls_here(capsys, *flags, "--seed", "0", "1", "--lr", "1e-3", "1e9",
                                  "--results_dir", str(tmp_path / "pack"))
    lines = err.strip().splitlines()
    assert status == 1 and len(lines) == 1 and "Traceback" not in err and "diverged" in lines[0], err
    bad, good = (record_of(tmp_path / "pack", *flags, "--seed", s, "--lr", lr) for s, lr in (("1", "1e9"),
                                                                                              ("0", "1e-3")))
    assert bad.status() == "diverged" and bad.name in lines[0] and good.name not in lines[0]
    assert good.status() == "finished" and len(statistics(good)) == 2
    status, _, err = run_cls_here(capsys, *flags, "--seed", "0", "--results_dir", str(tmp_path / "alone"))
    assert status == 0, err
    assert_close(statistics(good), statistics(record_of(tmp_path / "alone", *flags, "--seed", "0")), rtol=1e-6)


def stop_after_epoch_1(monkeypatch, capsys, *flags):
    end_epoch = RunRecord.end_epoch
    calls = []

    def then_terminate(record, *args):  # the pack's last member's end of epoch 1
        end_epoch(record, *args)
        calls.append(record)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    with monkeypatch.context() as m:
        m.setattr(RunRecord, "end_epoch", then_terminate)
        status, _, err = run_cls_here(capsys, *flags)
    assert status == 128 + signal.SIGTERM and "--resume" in err, err


def test_a_pack_resumes_to_the_csvs_of_an_uninterrupted_pack(tmp_path, data, capsys, monkeypatch):
    flags = ["--data_path", str(data), *SHORT, "--norm_type", "wn", "--epochs", "3"]
    stop_after_epoch_1(monkeypatch, capsys, *flags, "--seed", "0", "1", "--results_dir", str(tmp_path / "stopped"))
    status, out, err = run_cls_here(capsys, *flags, "--seed", "0", "1", "--resume", "--results_dir",
                                    str(tmp_path / "stopped"))
    assert status == 0 and "resuming at epoch 2" in out, err
    status, _, err = run_cls_here(capsys, *flags, "--seed", "0", "1", "--results_dir", str(tmp_path / "whole"))
    assert status == 0, err
    for seed in "01":
        pd.testing.assert_frame_equal(statistics(record_of(tmp_path / "stopped", *flags, "--seed", seed)),
                                      statistics(record_of(tmp_path / "whole", *flags, "--seed", seed)),
                                      check_exact=True)


def test_a_finished_member_is_never_trained_again(tmp_path, data, capsys):
    flags = ["--data_path", str(data), *SHORT]
    status, _, err = run_cls_here(capsys, *flags, "--seed", "0", "--results_dir", str(tmp_path))
    assert status == 0, err
    before = files_of(tmp_path)
    status, out, err = run_cls_here(capsys, *flags, "--seed", "0", "1", "--resume", "--results_dir", str(tmp_path))
    assert status == 0 and "seed0 is already finished" in out, err
    assert {k: v for k, v in files_of(tmp_path).items() if k in before} == before
    assert record_of(tmp_path, *flags, "--seed", "1").status() == "finished"
    assert json.loads(record_of(tmp_path, *flags, "--seed", "1").args.read_text())["pack"] == \
        [record_of(tmp_path, *flags, "--seed", "1").name]


# -----------------------------------------------------------------------------
# where packs go: the rule, refusals, sweep.py and torchrun

def test_auto_packs_where_steps_are_small_and_not_where_they_are_large():
    def auto(device: str, width: int, batch: int, data: str = "cifar10") -> int:
        return pack_size("auto", 8, device, batch, lambda: counts("resnet18", "bn", 10, 32, width)[1], data, False)
    assert [auto("cpu", 8, b) for b in (1, 2, 8, 32)] == [MOST] * 4  # measured to pay on a 2-core CPU
    assert [auto("cpu", 64, b) for b in (1, 2, 8, 32)] == [1] * 4  # measured not to
    assert auto("cuda", 64, 8) == MOST and auto("cuda", 64, 32) == 1
    assert auto("cpu", 8, 2, "imagenet") == 1
    assert pack_size(3, 8, "cpu", 32, lambda: counts("resnet18", "bn", 10, 32, 64)[1], "cifar10", False) == 3


def test_packing_what_cannot_pack_is_refused_in_one_line(tmp_path, capsys):
    status, _, err = run_cls_here(capsys, "--seed", "0", "1", "--pack", "2", "--data_name", "imagenet",
                                  "--results_dir", str(tmp_path))
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert all(w in err for w in ["--pack", "ImageNet", "one at a time"]) and not any(tmp_path.iterdir())
    with pytest.raises(UserError, match="--sync_bn's batch statistics have no packed form"):
        pack_size(2, 2, "cuda", 32, lambda: 1, "cifar10", True)  # --sync_bn where it synchronizes: torchrun
    assert pack_size("auto", 2, "cuda", 32, lambda: 1, "cifar10", True) == 1


@pytest.mark.parametrize("flags,words", [
    (["--seed", "0", "1", "--lr", "1e-3", "2e-3", "3e-3"], ["--seed", "--lr", "one a run", "2, 3"]),
    (["--seed", "0", "0"], ["given twice"]),
])
def test_runs_given_inconsistently_are_refused_in_one_line(tmp_path, capsys, flags, words):
    status, _, err = run_cls_here(capsys, *flags, "--results_dir", str(tmp_path))
    assert status == 2 and len(err.strip().splitlines()) == 1 and all(w in err for w in words), err


def test_sweep_packs_its_grid_into_processes_of_at_most_pack_runs(tmp_path, data):
    r = subprocess.run([sys.executable, str(ROOT / "sweep.py"), *NARROW, "--data_path", str(data), *SHORT, "--seed",
                        "0", "1", "2", "--lr", "1e-3", "2e-3", "--pack", "4", "--results_dir", str(tmp_path)],
                       capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    packs = {}
    for seed in "012":
        for lr in ("1e-3", "2e-3"):
            record = record_of(tmp_path, "--data_path", str(data), *SHORT, "--seed", seed, "--lr", lr)
            assert record.status() == "finished"
            packs[record.name] = tuple(json.loads(record.args.read_text())["pack"])
    assert sorted(map(len, set(packs.values()))) == [2, 4]  # 6 runs of one recipe but lr: a pack of 4, one of 2
    assert r.stdout.count("[1/2]") == 1 and "[2/2]" in r.stdout


def test_under_torchrun_every_process_holds_every_member(tmp_path, data, capsys):
    flags = ["--data_path", str(data), "--epochs", "2", "--lr", "1e-4", "--norm_type", "wn", "--init_images", "40",
             "--seed", "0", "1"]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(ROOT / "cls.py"), *NARROW, *flags, "--batch_size", "4", "--pack", "2", "--results_dir",
                        str(tmp_path / "two")], capture_output=True, text=True, env={**ENV, "OMP_NUM_THREADS": "1"},
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    status, _, err = run_cls_here(capsys, *flags, "--batch_size", "8", "--results_dir", str(tmp_path / "one"))
    assert status == 0, err
    for seed in "01":  # as tests/test_reliability.py's torchrun test, whose tolerance this is
        two = statistics(record_of(tmp_path / "two", *flags[:-3], "--seed", seed, "--batch_size", "4", world=2))
        one = statistics(record_of(tmp_path / "one", *flags[:-3], "--seed", seed, "--batch_size", "8"))
        for col in ("train_loss", "test_loss"):
            assert two[col].tolist() == pytest.approx(one[col].tolist(), rel=1e-4)
    assert np.isfinite(two[["train_loss", "test_loss", "test_top1"]].to_numpy()).all()


def test_a_data_set_with_few_images_still_writes_one_folder_a_run(tmp_path, capsys):
    data = write_cifar(tmp_path / "data", "cifar10", n_train=2, n_test=4)  # 10 images: one step of 8 and one of 2
    flags = ["--data_path", str(data), "--epochs", "1", "--batch_size", "8", "--seed", "0", "1", "2"]
    status, _, err = run_cls_here(capsys, *flags, "--results_dir", str(tmp_path / "results"))
    assert status == 0, err
    assert len(list((tmp_path / "results").glob("*/seed*/model.pth"))) == 3
