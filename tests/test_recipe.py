"""The training recipe: weight decay by role, the optimizers, the LR schedule, and the mechanism
behind WN's divergence: Adam with coupled L2 on a WN layer whose v gets no gradient collapses ||v||. And the
compile policy."""
import json
import math
from contextlib import nullcontext

import pandas as pd
import pytest
import torch
import torch.nn as nn

from conftest import NARROW, one_run, record_of, run_cls_here
from model import NORMS, WNConv2d, build_model
from recipe import Context, Recipe
from utils import runtime
from utils.optim import make_optimizer, make_scheduler


def args_of(*flags):
    return one_run(*NARROW, *flags)


def recipe_of(*flags):
    return Recipe.resolve(args_of(*flags), Context("cpu", 1, 40))


def decays(optimizer) -> dict:
    """{id(parameter): its weight decay}, asserting that every parameter is in exactly one group."""
    seen = [(id(p), group["weight_decay"]) for group in optimizer.param_groups for p in group["params"]]
    assert len(seen) == len({i for i, _ in seen})
    return dict(seen)


@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("flags,kind,decay", [
    ([], torch.optim.AdamW, 0.05), (["--optimizer", "adam", "--weight_decay", "5e-4"], torch.optim.Adam, 5e-4)])
def test_weight_decay_goes_to_conv_and_linear_weights_only(norm, flags, kind, decay):
    model = build_model("resnet18", norm, 10, width=8)
    optimizer = make_optimizer(model, recipe_of(*flags), torch.device("cpu"))
    assert type(optimizer) is kind
    got = decays(optimizer)
    assert set(got) == {id(p) for p in model.parameters()}
    for name, p in model.named_parameters():
        module_name, leaf = name.rsplit(".", 1)
        module = model.get_submodule(module_name)
        weight = leaf == "v" or (leaf == "weight" and isinstance(module, (nn.Conv2d, nn.Linear)))
        own_gain = any(hasattr(module, gain) for gain in ("g", "gain"))  # WN's g, scaled WS's gain
        # Decayed: conv and linear weights (WS's raw weight among them), and WN's v under AdamW. Never: WN's g,
        # scaled WS's gain, biases, BatchNorm's and GroupNorm's affines, the mean-only BN's bias, nor, under
        # Adam's coupled L2, the weight of a layer with its own gain (WN's v, scaled WS's weight).
        expected = decay if weight and not (own_gain and kind is torch.optim.Adam) else 0.0
        assert got[id(p)] == expected, name


def v_norm_after_1000_steps(make_optimizer) -> float:
    """||v|| / ||v0|| of a 16-channel 3x3 WN conv with g = 0 after 1000 steps of a loss that gives v no
    gradient: the last conv of a residual branch scaled to 0 at init, where WN went NaN on an H100 under the old
    recipe."""
    torch.manual_seed(0)
    model = nn.Sequential(WNConv2d(16, 16, 3))
    conv = model[0]
    with torch.no_grad():
        conv.g.zero_()
    v0 = conv.v.detach().norm().item()
    optimizer = make_optimizer(model)
    x = torch.randn(4, 16, 8, 8)
    for _ in range(1000):
        loss = model(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        assert conv.v.grad.abs().max() == 0  # nothing from the loss: g = 0
        optimizer.step()
    return conv.v.detach().norm().item() / v0


@pytest.mark.parametrize("flags", [[], ["--optimizer", "adam", "--weight_decay", "5e-4"]])
def test_no_documented_recipe_collapses_a_wn_layers_v(flags):
    ratio = v_norm_after_1000_steps(lambda model: make_optimizer(model, recipe_of(*flags), torch.device("cpu")))
    assert ratio >= 0.5


def test_the_old_recipe_collapses_v_so_the_test_above_would_have_caught_it():
    # The old recipe: Adam with its coupled L2 on every parameter.
    ratio = v_norm_after_1000_steps(lambda model: torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=5e-4))
    assert ratio < 0.01


def lrs(schedule: str, epochs=10, steps=10, warmup=1.0) -> list:
    """The learning rate of every step of a run."""
    recipe = recipe_of("--lr_schedule", schedule, "--epochs", str(epochs), "--warmup_epochs", str(warmup))
    optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=recipe.peak_lr())
    scheduler = make_scheduler(optimizer, recipe, steps)
    out = []
    for _ in range(epochs * steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_cosine_schedule_with_warmup():
    lr = lrs("cosine")  # 100 steps, the first 10 a warmup
    assert lr[0] == pytest.approx(1e-4) and lr[9] == pytest.approx(1e-3)  # step 0; the end of the warmup
    assert lr[10] == pytest.approx(1e-3) and lr[55] == pytest.approx(5e-4)  # halfway through the cosine
    assert lr[99] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 89 / 90))) and lr[99] < 1e-6
    assert all(a >= b for a, b in zip(lr[9:], lr[10:]))


def test_step_schedule_with_warmup():
    lr = lrs("step")
    assert lr[0] == pytest.approx(1e-4) and lr[9] == pytest.approx(1e-3)
    assert lr[49] == pytest.approx(1e-3) and lr[50] == pytest.approx(1e-4)  # x0.1 at 50% of the steps
    assert lr[74] == pytest.approx(1e-4) and lr[75] == pytest.approx(1e-5) and lr[99] == pytest.approx(1e-5)


def test_one_epoch_trains_at_the_full_rate_and_the_warmup_is_recorded_as_used(tmp_path, data, capsys):
    # The step schedule's milestones used to be epochs, {0} for one epoch: the whole run at lr / 10.
    flags = ["--data_path", str(data), "--epochs", "1", "--lr_schedule", "step", "--warmup_epochs", "0"]
    status, _, err = run_cls_here(capsys, *flags, "--results_dir", str(tmp_path))
    assert status == 0, err
    assert pd.read_csv(record_of(tmp_path, *flags).statistics).lr.tolist() == [1e-3]
    flags = ["--data_path", str(data), "--epochs", "1"]
    status, _, err = run_cls_here(capsys, *flags, "--results_dir", str(tmp_path))
    assert status == 0, err
    head = json.loads(record_of(tmp_path, *flags).args.read_text())
    assert (head["flags"]["warmup_epochs"], head["recipe"]["warmup_epochs"]) == (1.0, 0.5)  # as given, as used


@pytest.mark.parametrize("device,world,batch,mode", [
    ("cuda", 1, 1, "reduce-overhead"), ("cuda", 1, 32, "reduce-overhead"), ("cuda", 1, 512, "reduce-overhead"),
    ("cuda", 2, 32, "off"), ("cpu", 1, 1, "off"), ("cpu", 1, 512, "off")])
def test_compile_policy(device, world, batch, mode):
    # CUDA graphs on one GPU at every batch size; eager on the CPU and under DDP
    ctx = runtime.Context(0, world, torch.device(device), nullcontext(), torch.contiguous_format)
    assert runtime.compile_mode(args_of("--batch_size", str(batch)).compile, ctx) == mode
    assert runtime.compile_mode(args_of("--compile", "default").compile, ctx) == "default"
