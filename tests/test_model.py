"""model.py: the original table's Params and FLOPs, torchvision's ImageNet counts, and WN's numerics."""
import copy
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from model import MODELS, NORMS, WNConv2d, WNLinear, build_model
from utils import count_params_flops

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
    params, flops = count_params_flops(build_model(backbone, norm, 10), 32)
    want_params, want_flops = ORIGINAL[backbone, norm]
    assert f"{params / 1e6:.2f}" == f"{want_params:.2f}"
    assert abs(flops - want_flops) / want_flops < 0.015


@pytest.mark.parametrize("data_name,backbone,norm", list(COMPUTED))
def test_cifar100_and_wn_params(data_name, backbone, norm):
    num_classes = {"cifar10": 10, "cifar100": 100}[data_name]
    assert n_params(build_model(backbone, norm, num_classes)) == COMPUTED[data_name, backbone, norm]


@pytest.mark.parametrize("backbone", list(MODELS))
def test_wn_flops_match_bn_so_wn_convs_are_counted(backbone):
    _, bn = count_params_flops(build_model(backbone, "bn", 10), 32)
    _, wn = count_params_flops(build_model(backbone, "wn", 10), 32)
    assert abs(wn - bn) / bn < 0.015


@pytest.mark.parametrize("backbone,printed", [("resnet18", 11.69), ("resnet34", 21.80), ("resnet50", 25.56),
                                              ("resnext50", 25.03)])
def test_imagenet_stem_params_equal_torchvision(backbone, printed):
    ours = n_params(build_model(backbone, "bn", 1000, cifar_stem=False))
    assert ours == n_params(getattr(torchvision.models, TORCHVISION[backbone])())
    assert f"{ours / 1e6:.2f}" == f"{printed:.2f}"


@pytest.mark.parametrize("norm", list(NORMS))
def test_profiling_leaves_the_state_dict_keys_alone(norm):
    model = build_model("resnet18", norm, 10)
    before = list(model.state_dict())
    count_params_flops(model, 32)
    assert list(model.state_dict()) == before


@pytest.mark.parametrize("backbone", list(MODELS))
@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("cifar_stem,size", [(True, 32), (False, 64)])
def test_forward_shape_and_finite_gradients(backbone, norm, cifar_stem, size):
    torch.manual_seed(0)
    model = build_model(backbone, norm, 7, cifar_stem=cifar_stem)
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
    model = build_model("resnet18", "wn", 10).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    x = torch.randn(2, 3, 32, 32)
    want = model(x)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = build_model("resnet18", "wn", 10).eval()
    fresh.load_state_dict(torch.load(buffer))
    torch.testing.assert_close(fresh(x), want, atol=0, rtol=0)
    torch.testing.assert_close(copy.deepcopy(model)(x), want, atol=0, rtol=0)


def test_wn_norm_is_float32_under_autocast():
    torch.manual_seed(0)
    conv = WNConv2d(512, 4, 3)
    want = conv.weight
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv._v_norm().dtype == torch.float32
        torch.testing.assert_close(conv.weight, want, atol=0, rtol=0)
        assert conv(torch.randn(1, 512, 4, 4)).dtype == torch.bfloat16  # the conv itself does run in bf16
    half = copy.deepcopy(conv).bfloat16()
    assert half._v_norm().dtype == torch.float32


def test_torch_compile_wn_resnet18_forward_backward():
    torch.manual_seed(0)
    model = build_model("resnet18", "wn", 10)
    x = torch.randn(2, 3, 32, 32)
    eager = model(x)
    compiled = torch.compile(model)
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, eager, atol=1e-4, rtol=1e-4)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
