"""WN done properly: data-dependent init, deep residual nets at init, mean-only BN, GroupNorm, training."""
import numpy as np
import pandas as pd
import pytest
import torch

from conftest import counts, make_images, record_of, run_cls_here, write_cifar
from model import (MODELS, MeanOnlyBatchNorm2d, WNConv2d, WNLinear, build_model, data_dependent_init,
                   scale_residual_branches, wn_layers)
from recipe import residual_scales
from utils.data import DATASETS, CifarLoader


def cifar_loader(n=128, seed=0):
    images, labels = make_images(n, 10, np.random.default_rng(0), learnable=False)
    images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    return CifarLoader(images, torch.from_numpy(labels), 32, DATASETS["cifar10"].mean_std, True,
                       torch.device("cpu"), seed=seed)


def init_batch(n=16, seed=0):
    return cifar_loader(seed=seed).init_batch(n)[0]


def outputs_of(model, layers, x):
    """{layer: its output on x}, through forward hooks."""
    seen = {}
    # clone: the in-place ReLU after a WN conv (its norm is an Identity) overwrites the output
    hooks = [layer.register_forward_hook(lambda m, i, o: seen.__setitem__(m, o.clone())) for layer in layers]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    return seen


@pytest.mark.parametrize("backbone,width", [("resnet18", 8), ("resnext50", 16)])
def test_data_dependent_init_standardizes_every_wn_layer_on_the_init_batch(backbone, width):
    torch.manual_seed(0)
    model = build_model(backbone, "wn", 10, width=width)
    x = init_batch()
    data_dependent_init(model, x)  # no residual scaling here
    layers = wn_layers(model)
    assert len(layers) == sum(isinstance(m, (WNConv2d, WNLinear)) for m in model.modules()) > 20
    for out in outputs_of(model, layers, x).values():
        dims = [0, *range(2, out.dim())]
        assert out.mean(dims).abs().max() < 1e-3
        assert (out.std(dims, correction=0) - 1).abs().max() < 1e-2


@pytest.mark.parametrize("backbone", ["resnet50", "resnext50"])
def test_deep_wn_nets_start_with_bounded_activations(backbone):
    torch.manual_seed(0)
    model = build_model(backbone, "wn", 10, width=16)
    x = init_batch()
    data_dependent_init(model, x)
    scale_residual_branches(model, residual_scales(backbone, "auto"))  # cls.py's default
    stages = [model.stem, *model.stages()]
    seen = outputs_of(model, stages + [model.fc], x)
    for stage in stages:
        assert torch.isfinite(seen[stage]).all()
        assert 0.1 < seen[stage].std().item() < 10
    assert torch.isfinite(seen[model.fc]).all()


def test_residual_scaling_scales_only_the_branch_ends_and_never_v():
    torch.manual_seed(0)
    model = build_model("resnet50", "wn", 10, width=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scale_residual_branches(model, 0.0)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {f"{name}.conv3.g" for name, m in model.named_modules() if type(m).__name__ == "Bottleneck"}
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before if k.endswith(".v"))


@pytest.mark.parametrize("backbone,blocks", [("resnet18", (2, 2, 2, 2)), ("resnet34", (3, 4, 6, 3))])
def test_auto_residual_scale_is_one_over_the_blocks_of_the_stage(backbone, blocks):
    # Arpit et al. 2019 (victorcampos7/weightnorm-init): conv2_g_gain = 1 / resblocks_per_stage
    torch.manual_seed(0)
    model = build_model(backbone, "wn", 10, width=8)
    with torch.no_grad():
        for conv in wn_layers(model):
            conv.bias.fill_(1.0)
    scale_residual_branches(model, residual_scales(backbone, "auto"))
    for stage, n in zip(model.stages(), blocks, strict=True):
        for block in stage:
            torch.testing.assert_close(block.conv2.g, block.conv2.v_norm() / n)
            torch.testing.assert_close(block.conv2.bias, torch.full_like(block.conv2.bias, 1 / n))
            torch.testing.assert_close(block.conv1.g, block.conv1.v_norm())  # not a branch end: untouched


def test_init_is_identical_for_the_same_seed():
    def init(seed):
        torch.manual_seed(seed)
        model = build_model("resnet18", "wn", 10, width=8)
        data_dependent_init(model, init_batch(seed=seed))
        return model.state_dict()

    a, b, c = init(1), init(1), init(2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_mean_only_batch_norm():
    torch.manual_seed(0)
    norm = MeanOnlyBatchNorm2d(4)
    with torch.no_grad():
        norm.bias.copy_(torch.tensor([1.0, -2.0, 0.5, 0.0]))
    x = 3 + 2 * torch.randn(8, 4, 5, 5)
    out = norm(x)
    torch.testing.assert_close(out.mean((0, 2, 3)), norm.bias.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(out - x, (out - x)[:1, :, :1, :1].expand_as(x))  # a shift only: no scaling
    torch.testing.assert_close(norm.running_mean, 0.1 * x.mean((0, 2, 3)))
    norm.eval()
    torch.testing.assert_close(norm(x), x - (norm.running_mean - norm.bias).view(1, 4, 1, 1))


@pytest.mark.parametrize("backbone", list(MODELS))
def test_new_norms_params_and_flops(backbone):
    bn, wn, gn, mbn = (counts(backbone, norm) for norm in ("bn", "wn", "gn", "wn_mbn"))
    assert gn[0] == bn[0]  # GroupNorm's affine has BatchNorm's parameters
    assert mbn[0] == wn[0]  # mean-only BN's bias stands where the WN conv's bias was
    for _, flops in (gn, mbn):
        assert abs(flops - bn[1]) / bn[1] < 0.015


@pytest.mark.parametrize("norm,batch_size,epochs,n_train", [("bn", 16, 4, 80), ("wn", 1, 3, 40), ("wn", 64, 6, 80)])
def test_training_lowers_the_loss_on_a_learnable_task(tmp_path, capsys, norm, batch_size, epochs, n_train):
    data = write_cifar(tmp_path / "data", "cifar10", n_train=n_train // 5, n_test=10, learnable=True)
    flags = ["--data_path", str(data), "--norm_type", norm, "--batch_size", str(batch_size), "--epochs", str(epochs),
             "--init_images", "40"]
    status, _, err = run_cls_here(capsys, *flags, "--results_dir", str(tmp_path / "results"))
    assert status == 0, err
    stats = pd.read_csv(record_of(tmp_path / "results", *flags).statistics)
    assert stats.train_loss.iloc[-1] < 0.7 * stats.train_loss.iloc[0]
