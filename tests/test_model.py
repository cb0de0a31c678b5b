"""model.py: the original table's Params and FLOPs, torchvision's ImageNet counts, the registries, and WN's
numerics. Counts use the real widths; the rest narrow nets."""
import copy
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from recipe import make_parser
from conftest import counts
from model import (MODELS, NORMS, ScaledStdConv2d, StdConv2d, WNConv2d, WNLinear, build_model, count_params_flops,
                   group_norm, weight_layers)

# The original README's CIFAR-10 columns: Params (M) and FLOPs, for bn and in.
ORIGINAL = {
    ("resnet18", "bn"): (11.17, 556.67e6), ("resnet18", "in"): (11.16, 555.44e6),
    ("resnet34", "bn"): (21.28, 1.16e9), ("resnet34", "in"): (21.27, 1.16e9),
    ("resnet50", "bn"): (23.52, 1.30e9), ("resnet50", "in"): (23.47, 1.30e9),
    ("resnext50", "bn"): (22.99, 1.35e9), ("resnext50", "in"): (22.92, 1.34e9),
}

# Computed, not in the original. wn has bn's parameters (per conv, a bias where bn had beta and a gain g
# where bn had gamma) plus the final linear's g, one per class. in has no parameters, so in = bn - 2 x
# (norm channels). CIFAR-100 adds 100 - 10 = 90 outputs to the final linear: 90 x (features + 1).
COMPUTED = {
    ("cifar10", "resnet18", "wn"): 11_173_972, ("cifar10", "resnet34", "wn"): 21_282_132,
    ("cifar10", "resnet50", "wn"): 23_520_852, ("cifar10", "resnext50", "wn"): 22_992_724,
    ("cifar100", "resnet18", "bn"): 11_220_132, ("cifar100", "resnet34", "bn"): 21_328_292,
    ("cifar100", "resnet50", "bn"): 23_705_252, ("cifar100", "resnext50", "bn"): 23_177_124,
    ("cifar100", "resnet18", "wn"): 11_220_232, ("cifar100", "resnet34", "wn"): 21_328_392,
    ("cifar100", "resnet50", "wn"): 23_705_352, ("cifar100", "resnext50", "wn"): 23_177_224,
}
TORCHVISION = {"resnet18": "resnet18", "resnet34": "resnet34", "resnet50": "resnet50",
               "resnext50": "resnext50_32x4d"}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("backbone,norm", list(ORIGINAL))
def test_cifar10_params_and_flops_match_the_original_table(backbone, norm):
    params, flops = counts(backbone, norm)
    want_params, want_flops = ORIGINAL[backbone, norm]
    assert f"{params / 1e6:.2f}" == f"{want_params:.2f}"
    assert abs(flops - want_flops) / want_flops < 0.015


@pytest.mark.parametrize("data_name,backbone,norm", list(COMPUTED))
def test_cifar100_and_wn_params(data_name, backbone, norm):
    num_classes = {"cifar10": 10, "cifar100": 100}[data_name]
    params = counts(backbone, norm)[0] if num_classes == 10 else n_params(build_model(backbone, norm, num_classes))
    assert params == COMPUTED[data_name, backbone, norm]


@pytest.mark.parametrize("backbone", list(MODELS))
def test_wn_flops_match_bn_so_wn_convs_are_counted(backbone):
    (_, bn), (_, wn) = counts(backbone, "bn"), counts(backbone, "wn")
    assert abs(wn - bn) / bn < 0.015


@pytest.mark.parametrize("backbone,printed", [("resnet18", 11.69), ("resnet34", 21.80), ("resnet50", 25.56),
                                              ("resnext50", 25.03)])
def test_imagenet_stem_params_equal_torchvision(backbone, printed):
    ours = n_params(build_model(backbone, "bn", 1000, cifar_stem=False))
    assert ours == n_params(getattr(torchvision.models, TORCHVISION[backbone])())
    assert f"{ours / 1e6:.2f}" == f"{printed:.2f}"


@pytest.mark.parametrize("norm", list(NORMS))
def test_profiling_leaves_the_state_dict_keys_alone(norm):
    model = build_model("resnet18", norm, 10, width=8)
    before = list(model.state_dict())
    count_params_flops(model, 32)
    assert list(model.state_dict()) == before


@pytest.mark.parametrize("backbone", list(MODELS))
@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("cifar_stem,size", [(True, 32), (False, 64)])
def test_forward_shape_and_finite_gradients(backbone, norm, cifar_stem, size):
    torch.manual_seed(0)
    model = build_model(backbone, norm, 7, cifar_stem=cifar_stem, width=16)  # ResNeXt's 32 groups need 16
    logits = model(torch.randn(2, 3, size, size))
    assert logits.shape == (2, 7)
    logits.square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_layers_are_named_by_role_and_wn_has_no_norm_layer():
    names = dict(build_model("resnet50", "wn", 10).named_modules())
    assert {"layer1.0.conv1", "layer1.0.norm1", "layer1.0.conv3", "layer1.0.norm3"} <= set(names)
    assert isinstance(names["layer1.0.conv1"], WNConv2d) and isinstance(names["fc"], WNLinear)
    assert isinstance(names["layer1.0.norm1"], nn.Identity)
    assert names["layer1.0.conv1"].bias is not None and names["stem.0"].bias is not None
    assert names["layer1.0.conv2"].groups == 1
    assert dict(build_model("resnext50", "wn", 10).named_modules())["layer1.0.conv2"].groups == 32


# -----------------------------------------------------------------------------
# weight normalization numerics

def test_wn_conv_output_is_conv_with_g_v_over_norm_v():
    torch.manual_seed(0)
    conv = WNConv2d(6, 8, 3, stride=2, groups=2)
    with torch.no_grad():
        conv.g.uniform_(0.5, 2.0)
        conv.bias.normal_()
    x = torch.randn(3, 6, 9, 9)
    v = conv.v
    w = conv.g.view(-1, 1, 1, 1) * v / v.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    torch.testing.assert_close(conv(x), F.conv2d(x, w, conv.bias, stride=2, padding=1, groups=2),
                               atol=1e-6, rtol=0)


def test_wn_weight_has_an_eps_that_keeps_a_zero_v_finite():
    # pytorch/pytorch#19126: v / ||v|| has a NaN gradient at v = 0.
    conv = WNConv2d(4, 2, 3)
    with torch.no_grad():
        conv.v.zero_()
    conv(torch.randn(1, 4, 5, 5)).square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in conv.parameters())
    torch.manual_seed(0)
    conv = WNConv2d(4, 2, 3)
    sumsq = conv.v.detach().square().sum((1, 2, 3), keepdim=True)
    want = conv.g.detach().view(-1, 1, 1, 1) * conv.v.detach() / (sumsq + WNConv2d.eps).sqrt()
    torch.testing.assert_close(conv.weight.detach(), want, atol=1e-7, rtol=0)


def test_wn_starts_as_its_plain_kaiming_weight():
    conv = WNConv2d(16, 32, 3)
    torch.testing.assert_close(conv.weight, conv.v, atol=1e-6, rtol=0)
    assert torch.allclose(conv.g, conv.v.flatten(1).norm(dim=1))
    fan_out_std = (2 / (32 * 9)) ** 0.5  # kaiming_normal_(mode="fan_out", nonlinearity="relu")
    assert abs(conv.v.std().item() - fan_out_std) / fan_out_std < 0.1


@pytest.mark.parametrize("layer,shape", [(lambda: WNConv2d(3, 4, 3, stride=2), (2, 3, 5, 5)),
                                         (lambda: WNLinear(5, 3), (4, 5))])
def test_wn_gradcheck_float64(layer, shape):
    torch.manual_seed(0)
    module = layer().double()
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)

    def f(x, v, g, bias):
        return torch.func.functional_call(module, {"v": v, "g": g, "bias": bias}, (x,))

    params = (p.detach().clone().requires_grad_() for p in (module.v, module.g, module.bias))
    assert torch.autograd.gradcheck(f, (x, *params))


def test_wn_state_dict_round_trip_and_deepcopy_reproduce_outputs():
    torch.manual_seed(0)
    model = build_model("resnet18", "wn", 10, width=8).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    x = torch.randn(2, 3, 32, 32)
    want = model(x)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = build_model("resnet18", "wn", 10, width=8).eval()
    fresh.load_state_dict(torch.load(buffer))
    torch.testing.assert_close(fresh(x), want, atol=0, rtol=0)
    torch.testing.assert_close(copy.deepcopy(model)(x), want, atol=0, rtol=0)


def test_wn_norm_is_float32_under_autocast():
    torch.manual_seed(0)
    conv = WNConv2d(512, 4, 3)
    want = conv.weight
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv.v_norm().dtype == torch.float32
        torch.testing.assert_close(conv.weight, want, atol=0, rtol=0)
        assert conv(torch.randn(1, 512, 4, 4)).dtype == torch.bfloat16  # the conv itself does run in bf16
    half = copy.deepcopy(conv).bfloat16()
    assert half.v_norm().dtype == torch.float32


def test_torch_compile_wn_resnet18_forward_backward():
    # Dynamo's capture and AOTAutograd's functionalization of WN's `weight` property are what CUDA shares
    # with the CPU; inductor's CPU code generation is not what a GPU runs, and costs a minute here, so this
    # uses the aot_eager backend. tests/test_cuda.py compiles with inductor on CUDA.
    torch.manual_seed(0)
    model = build_model("resnet18", "wn", 10, width=8)
    x = torch.randn(2, 3, 32, 32)
    eager = model(x)
    compiled = torch.compile(model, backend="aot_eager")
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, eager, atol=1e-4, rtol=1e-4)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


# -----------------------------------------------------------------------------
# the registries and the layers by role

def test_every_norm_is_one_registry_entry_that_the_cli_offers():
    parser = make_parser()
    choices = {a.dest: a.choices for a in parser._actions}
    assert choices["norm_type"] == list(NORMS) and choices["backbone_type"] == list(MODELS)
    assert all(norm.label for norm in NORMS.values()) and all(m.label for m in MODELS.values())
    assert {k for k, norm in NORMS.items() if norm.data_init} == {"wn", "wn_mbn"}
    assert {k for k, norm in NORMS.items() if norm.scales_residuals} == {"wn", "wn_mbn", "sws"}
    assert {k for k, norm in NORMS.items() if norm.sync} == {"bn", "wn_mbn"}  # the norms with batch statistics


@pytest.mark.parametrize("norm", list(NORMS))
def test_weight_layers_are_every_conv_and_linear_with_their_roles(norm):
    model = build_model("resnet50", norm, 10, width=8)
    layers = weight_layers(model)
    assert len(layers) == 54  # 1 stem conv, 3 per Bottleneck x 16, 4 downsample convs, 1 fc
    for name, layer in layers.items():
        is_wn, is_ws = isinstance(layer.module, (WNConv2d, WNLinear)), isinstance(layer.module, StdConv2d)
        assert layer.direction is (layer.module.v if is_wn else layer.module.weight)
        if is_wn:
            assert layer.gain is layer.module.g
        elif isinstance(layer.module, ScaledStdConv2d):
            assert layer.gain is layer.module.gain
        else:
            assert layer.gain is None
        assert layer.reparameterized == (is_wn or is_ws)
        assert layer.weight() is layer.direction or layer.reparameterized


def test_narrow_nets_are_cheap_and_group_norm_fits_their_channels():
    _, wide = counts("resnet18", "bn")
    _, narrow = count_params_flops(build_model("resnet18", "bn", 10, width=8), 32)
    assert wide / narrow > 50
    assert group_norm(64).num_groups == 32 and group_norm(2048).num_groups == 32  # every real width
    assert group_norm(8).num_groups == 8 and group_norm(48).num_groups == 16
