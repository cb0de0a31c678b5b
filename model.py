"""ResNet-18/34/50 and ResNeXt-50 with a pluggable normalization: bn, in or wn.

The network never asks which norm it has. `build_model` looks the name up in `NORMS` and threads three
factories through the stem, the blocks and the downsample path, as torchvision's resnet.py does with
`norm_layer`:
    conv_layer(in_ch, out_ch, kernel_size, stride=1, groups=1) -> module
    norm_layer(channels) -> module
    linear_layer(in_features, out_features) -> module
Weight normalization (Salimans & Kingma 2016) changes the conv itself, so `wn` swaps in `WNConv2d` as the
conv factory and `nn.Identity` as the norm; the blocks have no branch for it.
"""
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


# -----------------------------------------------------------------------------
# weight normalization

class _WeightNormed(nn.Module):
    """Base of the layers whose weight is w = g * v / ||v|| (Salimans & Kingma 2016, eq. 2).

    v has the plain layer's weight shape, (out, in/groups, kh, kw) or (out, in); g and bias are (out,).
    The norm runs over every dim but the output channel. g starts at ||v||, so at init w == v and the layer
    is exactly its plain counterpart; the data-dependent init of the paper (section 3) may overwrite g
    and bias later, which is why both are plain parameters here.
    """

    def __init__(self, v: torch.Tensor, bias: bool):
        super().__init__()
        self.v = nn.Parameter(v)
        self.g = nn.Parameter(self._v_norm().flatten().detach().clone())
        self.bias = nn.Parameter(torch.zeros(v.shape[0])) if bias else None

    def _v_norm(self) -> torch.Tensor:
        # At least float32, even under autocast or for a bf16 model: a low-precision sum of squares over
        # 4608 terms (512 x 3 x 3) keeps only about 3 significant digits.
        dims = tuple(range(1, self.v.dim()))
        dtype = torch.promote_types(self.v.dtype, torch.float32)
        return torch.linalg.vector_norm(self.v, dim=dims, keepdim=True, dtype=dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight g * v / ||v||, in v's dtype. thop's counters read its shape too."""
        norm = self._v_norm()  # (out, 1, ...)
        g = self.g.to(norm.dtype).view_as(norm)
        return (self.v.to(norm.dtype) * (g / norm)).to(self.v.dtype)


class WNConv2d(_WeightNormed):
    """A weight-normalized conv; a subclass of nothing thop knows, so utils registers its counter."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, groups: int = 1,
                 bias: bool = True):
        v = torch.empty(out_ch, in_ch // groups, kernel_size, kernel_size)
        nn.init.kaiming_normal_(v, mode="fan_out", nonlinearity="relu")
        super().__init__(v, bias)
        self.in_channels, self.out_channels, self.groups = in_ch, out_ch, groups
        self.stride, self.padding = stride, kernel_size // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, 1, self.groups)

    def extra_repr(self) -> str:
        k = self.v.shape[-1]
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={k}, stride={self.stride}, "
                f"groups={self.groups}, bias={self.bias is not None}")


class WNLinear(_WeightNormed):
    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        v = nn.Linear(in_features, out_features).weight.detach()  # nn.Linear's default init
        super().__init__(v, bias)
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


# -----------------------------------------------------------------------------
# the normalization choices: the keys are cls.py's --norm_type choices

def conv2d(in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, groups: int = 1,
           bias: bool = False) -> nn.Conv2d:
    """A plain conv with torchvision's Kaiming init; no bias by default, since the norm after it shifts."""
    conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride, kernel_size // 2, groups=groups, bias=bias)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


def batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels)


def instance_norm(channels: int) -> nn.InstanceNorm2d:
    # torch's defaults, no affine and no running stats: the original's parameter counts imply them.
    return nn.InstanceNorm2d(channels)


def no_norm(channels: int) -> nn.Identity:
    return nn.Identity()


def group_norm(channels: int) -> nn.GroupNorm:
    # 32 groups, as in Wu & He 2018: ResNet-50 on ImageNet at 24.1% error for every batch from 32 down to 2.
    return nn.GroupNorm(32, channels)


class MeanOnlyBatchNorm2d(nn.Module):
    """Mean-only batch norm (Salimans & Kingma 2016, section 2.2): subtract the per-channel batch mean, or a
    running mean at eval time, then add a learned bias. After a bias-free WN conv, WN fixes the scale and
    this the shift: the paper's best CIFAR-10 result, 7.31% error against 8.46% for WN alone."""

    def __init__(self, channels: int, momentum: float = 0.1):
        super().__init__()
        self.momentum = momentum
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        if self.training:
            mean = x.mean(dim=(0, 2, 3), dtype=torch.float32)
            with torch.no_grad():
                self.running_mean.lerp_(mean, self.momentum)
        else:
            mean = self.running_mean
        return x - (mean - self.bias).to(x.dtype).view(1, -1, 1, 1)


@dataclass(frozen=True)
class Norm:
    conv_layer: Callable[..., nn.Module]
    norm_layer: Callable[[int], nn.Module]
    linear_layer: Callable[[int, int], nn.Module] = nn.Linear


NORMS = {
    "bn": Norm(conv2d, batch_norm),
    "in": Norm(conv2d, instance_norm),
    # Every conv gets a bias where bn had a BatchNorm: WN alone has no shift.
    "wn": Norm(WNConv2d, no_norm, WNLinear),
    "wn_mbn": Norm(partial(WNConv2d, bias=False), MeanOnlyBatchNorm2d, WNLinear),
    "gn": Norm(conv2d, group_norm),
}


# -----------------------------------------------------------------------------
# the networks

class BasicBlock(nn.Module):
    expansion = 1
    branch_end = "conv2"  # the last layer of the residual branch, scaled down at WN's init

    def __init__(self, in_ch: int, planes: int, stride: int, downsample: nn.Module, norm: Norm,
                 groups: int = 1, width_per_group: int = 64):
        super().__init__()
        if groups != 1 or width_per_group != 64:
            raise ValueError("BasicBlock supports only groups=1 and width_per_group=64")
        self.conv1 = norm.conv_layer(in_ch, planes, 3, stride)
        self.norm1 = norm.norm_layer(planes)
        self.conv2 = norm.conv_layer(planes, planes, 3)
        self.norm2 = norm.norm_layer(planes)
        self.downsample = downsample
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.relu(out + self.downsample(x))


class Bottleneck(nn.Module):
    """ResNet-50's block (stride on the 3x3, as torchvision's "ResNet v1.5"); groups=32 and
    width_per_group=4 make it ResNeXt-50 32x4d's."""
    expansion = 4
    branch_end = "conv3"

    def __init__(self, in_ch: int, planes: int, stride: int, downsample: nn.Module, norm: Norm,
                 groups: int = 1, width_per_group: int = 64):
        super().__init__()
        width = int(planes * width_per_group / 64) * groups
        self.conv1 = norm.conv_layer(in_ch, width, 1)
        self.norm1 = norm.norm_layer(width)
        self.conv2 = norm.conv_layer(width, width, 3, stride, groups)
        self.norm2 = norm.norm_layer(width)
        self.conv3 = norm.conv_layer(width, planes * self.expansion, 1)
        self.norm3 = norm.norm_layer(planes * self.expansion)
        self.downsample = downsample
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.relu(self.norm2(self.conv2(out)))
        out = self.norm3(self.conv3(out))
        return self.relu(out + self.downsample(x))


class ResNet(nn.Module):
    def __init__(self, block: type, layers: tuple, norm: Norm, num_classes: int, cifar_stem: bool = True,
                 groups: int = 1, width_per_group: int = 64):
        super().__init__()
        if cifar_stem:  # 32x32 inputs: keep the resolution, the last stage works on 4x4
            self.stem = nn.Sequential(norm.conv_layer(3, 64, 3), norm.norm_layer(64), nn.ReLU(inplace=True))
        else:  # 224x224 inputs: /4 before the first stage
            self.stem = nn.Sequential(norm.conv_layer(3, 64, 7, 2), norm.norm_layer(64), nn.ReLU(inplace=True),
                                      nn.MaxPool2d(3, 2, 1))
        self.in_ch = 64
        block_args = dict(norm=norm, groups=groups, width_per_group=width_per_group)
        self.layer1 = self._make_stage(block, 64, layers[0], 1, block_args)
        self.layer2 = self._make_stage(block, 128, layers[1], 2, block_args)
        self.layer3 = self._make_stage(block, 256, layers[2], 2, block_args)
        self.layer4 = self._make_stage(block, 512, layers[3], 2, block_args)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = norm.linear_layer(512 * block.expansion, num_classes)

    def _make_stage(self, block: type, planes: int, blocks: int, stride: int, block_args: dict) -> nn.Sequential:
        norm, out_ch = block_args["norm"], planes * block.expansion
        downsample = nn.Identity()
        if stride != 1 or self.in_ch != out_ch:
            downsample = nn.Sequential(norm.conv_layer(self.in_ch, out_ch, 1, stride), norm.norm_layer(out_ch))
        stage = [block(self.in_ch, planes, stride, downsample, **block_args)]
        self.in_ch = out_ch
        stage += [block(out_ch, planes, 1, nn.Identity(), **block_args) for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> logits (B, num_classes)."""
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


MODELS = {
    "resnet18": dict(block=BasicBlock, layers=(2, 2, 2, 2)),
    "resnet34": dict(block=BasicBlock, layers=(3, 4, 6, 3)),
    "resnet50": dict(block=Bottleneck, layers=(3, 4, 6, 3)),
    "resnext50": dict(block=Bottleneck, layers=(3, 4, 6, 3), groups=32, width_per_group=4),
}


def build_model(backbone_type: str, norm_type: str, num_classes: int, cifar_stem: bool = True) -> ResNet:
    return ResNet(norm=NORMS[norm_type], num_classes=num_classes, cifar_stem=cifar_stem, **MODELS[backbone_type])


# -----------------------------------------------------------------------------
# WN's initialization

def wn_layers(model: nn.Module) -> list:
    return [m for m in model.modules() if isinstance(m, _WeightNormed)]


@torch.no_grad()
def data_dependent_init(model: nn.Module, x: torch.Tensor) -> None:
    """Salimans & Kingma 2016, section 3: in forward order, each WN layer sees the outputs of the layers
    before it, already initialized; with t = v·x/||v||, per output channel, it sets g = 1/std(t) and
    b = -mean(t)/std(t), so that its output starts at zero mean and unit variance. One forward pass does
    it: a hook standardizes each layer's output before the next layer sees it."""
    def standardize(layer, inputs, output):
        layer.g.fill_(1.0)
        if layer.bias is not None:
            layer.bias.zero_()
        t = layer.forward(*inputs).float()  # (B, C, H, W) or (B, C); forward() skips this hook
        dims = [0, *range(2, t.dim())]
        mean, std = t.mean(dims), t.std(dims, correction=0) + 1e-8
        layer.g.copy_(1 / std)
        if layer.bias is not None:  # else a mean-only BN after the layer removes the mean
            layer.bias.copy_(-mean / std)
        return layer.forward(*inputs)

    hooks = [layer.register_forward_hook(standardize) for layer in wn_layers(model)]
    try:
        model(x)
    finally:
        for hook in hooks:
            hook.remove()


@torch.no_grad()
def scale_residual_branches(model: nn.Module, scale: float) -> None:
    """Multiply the output of the last WN layer of every residual branch by `scale` (its g and bias; v is
    never touched, since ||v|| = 0 makes the gradient NaN, pytorch issue 19126). After the data-dependent
    init each branch adds unit variance to the residual stream, and plain WN ResNet-50 trains badly
    (Gitman & Ginsburg 2017: about 6% below BN on ImageNet); a small branch at init, as in SkipInit (De &
    Smith 2020) and Fixup (Zhang et al. 2019), keeps the stream near the identity. See README for the
    measurement behind the default scale."""
    for block in model.modules():
        end = getattr(block, getattr(block, "branch_end", ""), None)
        if isinstance(end, _WeightNormed):
            end.g.mul_(scale)
            if end.bias is not None:
                end.bias.mul_(scale)
