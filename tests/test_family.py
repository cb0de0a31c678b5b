"""WN's family: Weight Standardization + GroupNorm (ws_gn), scaled WS without activation norm (sws), and
adaptive gradient clipping (--agc). Counts use the real widths; the rest narrow nets."""
import math
from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import cls
from conftest import counts, record_of, run_cls_here
from model import (MODELS, NORMS, BasicBlock, ResNet, ScaledStdConv2d, StdConv2d, build_model, scale_residual_branches,
                   weight_layers)
from recipe import RECIPE_FLAGS, RENAMED, residual_scales
from utils.optim import make_agc
from utils.pack import Member, Pack, PackedNet

GAMMA_RELU = math.sqrt(2 / (1 - 1 / math.pi))


def ws_layers(model, kind=StdConv2d) -> list:
    return [layer for layer in weight_layers(model).values() if isinstance(layer.module, kind)]


def per_channel(w: torch.Tensor) -> tuple:
    """(mean, biased variance) of each output channel of a conv weight (out, in/groups, kh, kw)."""
    var, mean = torch.var_mean(w.detach().double().flatten(1), dim=1, correction=0)
    return mean, var


# -----------------------------------------------------------------------------
# the effective weights

@pytest.mark.parametrize("backbone", ["resnet50", "resnext50"])
def test_ws_gn_weights_are_standardized_per_output_channel(backbone):
    torch.manual_seed(0)
    model = build_model(backbone, "ws_gn", 10)  # the real widths: the smallest var v of all (ResNeXt's 3x3)
    layers = ws_layers(model)
    assert len(layers) == 53  # every conv; the fc stays plain
    v = layers[-1].direction  # (2048, 512, 1, 1), std 0.03
    with torch.no_grad():  # wherever training moves v: a scale per channel, a shift of a few stds
        v.mul_(torch.empty(v.shape[0], 1, 1, 1).uniform_(0.5, 10)).add_(0.1)
    for layer in layers:
        assert layer.gain is None  # ws_gn's gain is GroupNorm's affine
        mean, var = per_channel(layer.weight())
        assert mean.abs().max() < 1e-4 and (var - 1).abs().max() < 1e-4


def test_ws_conv_applies_its_standardized_weight():
    torch.manual_seed(0)
    conv = StdConv2d(6, 8, 3, stride=2, groups=2, bias=True)
    with torch.no_grad():
        conv.bias.normal_()
    x = torch.randn(3, 6, 9, 9)
    v = conv.weight.detach()
    w = (v - v.mean((1, 2, 3), keepdim=True)) / v.std((1, 2, 3), correction=0, keepdim=True)
    torch.testing.assert_close(conv(x), F.conv2d(x, w, conv.bias, stride=2, padding=1, groups=2), atol=1e-5, rtol=0)


@pytest.mark.parametrize("backbone", ["resnet18", "resnext50"])
def test_sws_weights_are_zero_mean_with_variance_gamma_squared_over_fan_in(backbone):
    torch.manual_seed(0)
    model = build_model(backbone, "sws", 10, width=16)
    layers = ws_layers(model, ScaledStdConv2d)
    assert len(layers) == len(weight_layers(model)) - 1  # every conv; the fc stays plain
    # DeepMind's and timm's 1.7139588594436646 estimates the same constant by sampling
    assert ScaledStdConv2d.gamma == GAMMA_RELU == pytest.approx(1.7139588594436646, rel=1e-3)
    for layer in layers:
        torch.testing.assert_close(layer.gain.detach(), torch.ones_like(layer.gain))  # before the init's scaling
        fan_in = layer.direction[0].numel()
        mean, var = per_channel(layer.weight())
        assert mean.abs().max() < 1e-6
        torch.testing.assert_close(var, torch.full_like(var, GAMMA_RELU**2 / fan_in), rtol=1e-4, atol=0)
    layer = layers[3]
    with torch.no_grad():
        layer.gain.uniform_(0.5, 2.0)
    _, var = per_channel(layer.weight())
    want = layer.gain.detach().double() ** 2 * GAMMA_RELU**2 / layer.direction[0].numel()
    torch.testing.assert_close(var, want, rtol=1e-4, atol=0)


# -----------------------------------------------------------------------------
# parameters and FLOPs

@pytest.mark.parametrize("backbone", list(MODELS))
def test_ws_gn_and_sws_have_exactly_bns_parameters_and_flops_counted(backbone):
    bn, ws_gn, sws = (counts(backbone, norm) for norm in ("bn", "ws_gn", "sws"))
    assert ws_gn[0] == bn[0]  # GroupNorm's affine where BatchNorm's was; WS adds no parameter
    assert sws[0] == bn[0]  # per conv a gain and a bias where bn had BatchNorm's weight and bias
    for _, flops in (ws_gn, sws):  # thop counts the WS convs, by exact type, only if told to
        assert abs(flops - bn[1]) / bn[1] < 0.015


# -----------------------------------------------------------------------------
# sws at init

def sws_model(backbone, width, residual_scale="auto"):
    """An sws net after cls.py's init, with its default residual scale unless told."""
    model = build_model(backbone, "sws", 10, width=width)
    assert NORMS["sws"].scales_residuals and not NORMS["sws"].data_init  # its init needs no images
    scale_residual_branches(model, residual_scales(backbone, residual_scale))
    return model


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50", "resnext50"])
def test_sws_keeps_every_stage_output_std_bounded_at_init(backbone):
    torch.manual_seed(0)
    model = sws_model(backbone, width=16)  # ResNeXt's 32 groups need 16
    stages = [model.stem, *model.stages()]
    seen = {}
    hooks = [stage.register_forward_hook(lambda m, i, o: seen.__setitem__(m, o.std().item())) for stage in stages]
    with torch.no_grad():
        model(torch.randn(16, 3, 32, 32))
    for hook in hooks:
        hook.remove()
    assert all(0.2 < seen[stage] < 5 for stage in stages), seen


def test_sws_init_scales_the_gain_and_bias_of_each_branch_end_only():
    torch.manual_seed(0)
    model = build_model("resnet50", "sws", 10, width=8)
    with torch.no_grad():
        for layer in ws_layers(model):
            layer.module.bias.fill_(1.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scale_residual_branches(model, 0.3)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    ends = [name for name, m in model.named_modules() if type(m).__name__ == "Bottleneck"]
    assert changed == {f"{end}.conv3.{leaf}" for end in ends for leaf in ("gain", "bias")}
    for end in ends:
        conv3 = model.get_submodule(f"{end}.conv3")
        torch.testing.assert_close(conv3.gain, torch.full_like(conv3.gain, 0.3))
        torch.testing.assert_close(conv3.bias, torch.full_like(conv3.bias, 0.3))


# -----------------------------------------------------------------------------
# adaptive gradient clipping

def agc_of(model, clipping):
    return make_agc(model, cls.parse_args(["--agc", str(clipping)]))


def test_agc_clips_exactly_per_unit():
    model = build_model("resnet18", "bn", 10, width=8)
    conv = model.layer1[0].conv1  # (8, 8, 3, 3)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0].fill_(1 / 24)  # ||W|| = 72^0.5 / 24 = 0.35355
        conv.weight[1].fill_(1 / 24)
        conv.weight[2, 0, 0, 0] = 2.0  # ||W|| = 2
        # units 3 to 7 stay zero: their limit is 0.01 * max(0, 1e-3)
    grad = torch.zeros_like(conv.weight)
    grad[0, 0, 0, 0] = 0.01  # ratio 0.028 > 0.01: clipped to 0.01 * 0.35355
    grad[1, 0, 0, 0] = 0.003  # ratio 0.0085 < 0.01: left as it is
    grad[2, :, 1, 1] = 0.5  # ||G|| = 8^0.5 / 2 = 1.41421, ratio 0.7: clipped to 0.01 * 2
    grad[3, 0, 0, 0] = 0.5e-5  # below 0.01 * 1e-3: left as it is
    grad[4, 0, 0, 0] = -1.0  # clipped to 0.01 * 1e-3 = 1e-5
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    conv.weight.grad = grad.clone()
    agc_of(model, 0.01).clip()
    want = grad.clone()
    want[0, 0, 0, 0] = 0.01 * 72**0.5 / 24
    want[2] *= 0.01 * 2 / 2**0.5
    want[4, 0, 0, 0] = -1e-5
    torch.testing.assert_close(conv.weight.grad, want, atol=1e-9, rtol=1e-6)
    convs = {id(layer.direction) for name, layer in weight_layers(model).items() if name != "fc"}
    untouched = [p for p in model.parameters() if id(p) not in convs]  # the fc, the biases, BatchNorm's affines
    assert id(model.fc.weight) not in convs and all((p.grad == 1).all() for p in untouched)


@pytest.mark.parametrize("norm", ["bn", "wn", "ws_gn", "sws"])
def test_agc_acts_on_every_weight_but_the_final_linears_by_role(norm):
    model = build_model("resnet18", norm, 10, width=8)
    agc = agc_of(model, 0.01)
    layers = weight_layers(model)
    assert {id(p) for p in agc.params} == {id(layer.direction) for name, layer in layers.items() if name != "fc"}
    assert len(agc.params) == len(layers) - 1 == 20  # the 20 convs: WN's v, WS's raw weight, or the weight
    assert agc_of(model, 0).params == []  # off: nothing to clip


def clipped_by_hand(weight, grad, clipping):
    dims = tuple(range(1, weight.dim()))
    w_norm = torch.linalg.vector_norm(weight.detach(), dim=dims, keepdim=True).clamp_min(1e-3)
    g_norm = torch.linalg.vector_norm(grad, dim=dims, keepdim=True)
    return torch.where(g_norm > clipping * w_norm, grad * clipping * w_norm / g_norm, grad)


def test_agc_clips_the_real_parameters_of_a_compiled_ddp_model(tmp_path):
    # A DDP wrapper and torch.compile leave the gradients on the model's own parameters after backward, where
    # train_step clips them. One process of gloo; tests/test_reliability.py runs DDP on two.
    torch.manual_seed(0)
    model = ResNet(BasicBlock, (1, 1, 1, 1), NORMS["wn"], 10, width=8)  # a block a stage: half the compile time
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    F.cross_entropy(model(x), y).backward()
    unclipped = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        net = PackedNet([model])
        wrapped = torch.compile(torch.nn.parallel.DistributedDataParallel(net), backend="aot_eager")
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the step leaves the weights and .grad alone
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        run = SimpleNamespace(optimizer=optimizer, scheduler=scheduler, agc=agc_of(model, 0.01))
        pack = Pack([Member(None, None, run)], net, wrapped, None, torch.ones(1, dtype=torch.bool))
        cls.train_step(pack, x, y[:, None], nullcontext())
    finally:
        dist.destroy_process_group()
    layers = weight_layers(model)
    clipped = 0
    for name, p in model.named_parameters():
        want = unclipped[name]
        if any(p is layer.direction for key, layer in layers.items() if key != "fc"):
            want = clipped_by_hand(p, want, 0.01)
            clipped += not torch.equal(want, unclipped[name])
        torch.testing.assert_close(p.grad, want, atol=1e-6, rtol=1e-4, msg=name)
    assert clipped > 10  # the test clips something


# -----------------------------------------------------------------------------
# the flags

def test_residual_scale_keeps_its_old_name_as_an_alias():
    assert cls.parse_args(["--residual_scale", "0.2"]).residual_scale == 0.2
    assert cls.parse_args(["--wn_residual_scale", "0.3"]).residual_scale == 0.3
    assert not hasattr(cls.parse_args([]), "wn_residual_scale")
    assert set(RENAMED.values()) <= set(RECIPE_FLAGS) and not set(RENAMED) & set(RECIPE_FLAGS)
    assert "agc" in RECIPE_FLAGS and cls.parse_args([]).agc == 0


# -----------------------------------------------------------------------------
# training end to end

@pytest.mark.parametrize("agc", ["0", "0.01"])
@pytest.mark.parametrize("norm", ["ws_gn", "sws"])
def test_two_epochs_stay_finite_and_the_layer_statistics_see_the_effective_weights(tmp_path, data, capsys, norm,
                                                                                     agc):
    flags = ["--data_path", str(data), "--norm_type", norm, "--agc", agc, "--epochs", "2", "--batch_size", "8"]
    status, _, err = run_cls_here(capsys, *flags, "--results_dir", str(tmp_path))
    assert status == 0, err  # sws's init reads no images: the default --init_images 512 of 40 is no error
    record = record_of(tmp_path, *flags)
    stats = pd.read_csv(record.statistics)
    assert len(stats) == 2 and np.isfinite(stats[["train_loss", "test_loss"]].to_numpy()).all()
    assert record.status() == "finished"

    rows = pd.read_csv(record.layers_csv)
    last = rows[(rows.epoch == 2) & (rows.kind != "block")].set_index("layer")
    model = build_model("resnet18", norm, 10, width=8)
    model.load_state_dict(torch.load(record.weights)["model"])
    for name, layer in weight_layers(model).items():
        assert math.isclose(last.weight_norm[name], layer.weight().norm().item(), rel_tol=1e-5)
        if name == "fc":
            assert last.loc[name, ["v_norm", "g_mean", "g_min"]].isna().all()
            continue
        assert math.isclose(last.v_norm[name], layer.direction.norm().item(), rel_tol=1e-5)
        if norm == "ws_gn":  # unit variance per channel: ||w||^2 = numel
            assert math.isclose(last.weight_norm[name], layer.direction.numel() ** 0.5, rel_tol=1e-4)
            assert last.loc[name, ["g_mean", "g_min"]].isna().all()
        else:
            assert math.isclose(last.g_mean[name], layer.gain.mean().item(), rel_tol=1e-5)
            assert math.isclose(last.g_min[name], layer.gain.min().item(), rel_tol=1e-5)
