"""ResNet-18/34/50 and ResNeXt-50 with a pluggable normalization: bn, in, wn, wn_mbn, gn, ws_gn or sws.

The network never asks which norm it has. `NORMS` holds, for each --norm_type, everything a norm needs: the
three factories that `build_model` threads through the stem, the blocks and the downsample path (as
torchvision's resnet.py does with `norm_layer`), its label in tables and plots, its init and how --sync_bn
synchronizes it:
    conv_layer(in_ch, out_ch, kernel_size, stride=1, groups=1) -> module
    norm_layer(channels) -> module
    linear_layer(in_features, out_features) -> module
Weight normalization (Salimans & Kingma 2016) changes the conv itself, so `wn` swaps in `WNConv2d` as the
conv factory and `nn.Identity` as the norm; the blocks have no branch for it, and neither do weight
standardization's convs (ws_gn, sws). Adding a norm is one entry; its layers beside torch's are in
utils/layers.py.
"""
import copy
import functools
from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional, Union

import thop
import torch
import torch.nn as nn

from utils.layers import (MeanOnlyBatchNorm2d, Reparameterized, ScaledStdConv2d, StdConv2d, WeightLayer,  # noqa: F401
                          WeightNormed, WNConv2d, WNLinear, sync_mean_only_bn, weight_layer, weight_layers)


# -----------------------------------------------------------------------------
# the layers a norm is made of, beside those of utils/layers.py

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


def group_norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    # 32 groups, as in Wu & He 2018: ResNet-50 on ImageNet at 24.1% error for every batch from 32 down to 2.
    # Every layer of the real widths has a multiple of 32 channels; a narrow net (--width 8) gets 32 halved
    # until it divides its channels.
    while channels % groups:
        groups //= 2
    return nn.GroupNorm(groups, channels)


# -----------------------------------------------------------------------------
# the registries: their keys are cls.py's --norm_type and --backbone_type choices

@dataclass(frozen=True)
class Norm:
    label: str  # in tables and plots
    conv_layer: Callable[..., nn.Module]
    norm_layer: Callable[[int], nn.Module]
    linear_layer: Callable[[int, int], nn.Module] = nn.Linear
    data_init: bool = False  # WN's data-dependent init on a batch of --init_images training images
    scales_residuals: bool = False  # --residual_scale scales the last layer of every residual branch at init
    # --sync_bn under torchrun: the model with its batch statistics taken over all ranks; None for a norm
    # without batch statistics, which --sync_bn leaves as it is
    sync: Optional[Callable[[nn.Module], nn.Module]] = None


@dataclass(frozen=True)
class Backbone:
    label: str
    block: type
    layers: tuple  # blocks per stage
    groups: int = 1
    width_per_group: int = 64


NORMS = {
    "bn": Norm("BN", conv2d, batch_norm, sync=nn.SyncBatchNorm.convert_sync_batchnorm),
    "in": Norm("IN", conv2d, instance_norm),
    # Every conv gets a bias where bn had a BatchNorm: WN alone has no shift.
    "wn": Norm("WN", WNConv2d, no_norm, WNLinear, data_init=True, scales_residuals=True),
    "wn_mbn": Norm("WN+MBN", partial(WNConv2d, bias=False), MeanOnlyBatchNorm2d, WNLinear, data_init=True,
                   scales_residuals=True, sync=sync_mean_only_bn),
    "gn": Norm("GN", conv2d, group_norm),
    "ws_gn": Norm("WS+GN", StdConv2d, group_norm),
    # No activation norm: every conv gets a bias and a gain where bn had BatchNorm's affine, and the residual
    # branches are scaled down as NF-ResNets' (their alpha), as WN's are.
    "sws": Norm("SWS", ScaledStdConv2d, no_norm, scales_residuals=True),
}


# -----------------------------------------------------------------------------
# the networks

class BasicBlock(nn.Module):
    expansion = 1
    branch_end = "conv2"  # the last layer of the residual branch, scaled down at WN's and sws's init

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
    """`width` is the stem's channels, doubled at every stage: 64 in the papers; the tests train nets of
    width 8, about 60x cheaper, wherever they check the machinery rather than the real counts."""

    def __init__(self, block: type, layers: tuple, norm: Norm, num_classes: int, cifar_stem: bool = True,
                 groups: int = 1, width_per_group: int = 64, width: int = 64):
        super().__init__()
        if cifar_stem:  # 32x32 inputs: keep the resolution, the last stage works on 4x4
            self.stem = nn.Sequential(norm.conv_layer(3, width, 3), norm.norm_layer(width), nn.ReLU(inplace=True))
        else:  # 224x224 inputs: /4 before the first stage
            self.stem = nn.Sequential(norm.conv_layer(3, width, 7, 2), norm.norm_layer(width),
                                      nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        self.in_ch = width
        block_args = dict(norm=norm, groups=groups, width_per_group=width_per_group)
        self.layer1 = self._make_stage(block, width, layers[0], 1, block_args)
        self.layer2 = self._make_stage(block, 2 * width, layers[1], 2, block_args)
        self.layer3 = self._make_stage(block, 4 * width, layers[2], 2, block_args)
        self.layer4 = self._make_stage(block, 8 * width, layers[3], 2, block_args)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = norm.linear_layer(8 * width * block.expansion, num_classes)

    def _make_stage(self, block: type, planes: int, blocks: int, stride: int, block_args: dict) -> nn.Sequential:
        norm, out_ch = block_args["norm"], planes * block.expansion
        downsample = nn.Identity()
        if stride != 1 or self.in_ch != out_ch:
            downsample = nn.Sequential(norm.conv_layer(self.in_ch, out_ch, 1, stride), norm.norm_layer(out_ch))
        stage = [block(self.in_ch, planes, stride, downsample, **block_args)]
        self.in_ch = out_ch
        stage += [block(out_ch, planes, 1, nn.Identity(), **block_args) for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    def stages(self) -> list:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> logits (B, num_classes)."""
        x = self.stem(x)
        for stage in self.stages():
            x = stage(x)
        return self.fc(torch.flatten(self.pool(x), 1))


MODELS = {
    "resnet18": Backbone("ResNet18", BasicBlock, (2, 2, 2, 2)),
    "resnet34": Backbone("ResNet34", BasicBlock, (3, 4, 6, 3)),
    "resnet50": Backbone("ResNet50", Bottleneck, (3, 4, 6, 3)),
    "resnext50": Backbone("ResNeXt50", Bottleneck, (3, 4, 6, 3), groups=32, width_per_group=4),
}


def build_model(backbone_type: str, norm_type: str, num_classes: int, cifar_stem: bool = True,
                width: int = 64) -> ResNet:
    b = MODELS[backbone_type]
    return ResNet(b.block, b.layers, NORMS[norm_type], num_classes, cifar_stem, b.groups, b.width_per_group, width)


def min_width(backbone_type: str, norm_type: str) -> int:
    """The narrowest `width` that builds a working network: a Bottleneck's 3x3 conv has int(planes *
    width_per_group / 64) * groups channels, none for ResNeXt-50 (4 per group) below 16; and a weight-standardized
    conv needs two inputs at least, since one weight per output channel standardizes to 0/0 (F.batch_norm refuses
    it), which the 1x1 convs fed by the stem have at width 1."""
    narrowest = -(-64 // MODELS[backbone_type].width_per_group)
    return max(narrowest, 2) if isinstance(NORMS[norm_type].conv_layer(1, 1, 1), StdConv2d) else narrowest


# -----------------------------------------------------------------------------
# where the inits and the layer statistics act

def wn_layers(model: nn.Module) -> list:
    return [m for m in model.modules() if isinstance(m, WeightNormed)]


def blocks(model: ResNet) -> dict:
    """{name: module} for the stem and every residual block, in forward order: where the signal is read."""
    return {"stem": model.stem, **{f"layer{i}.{j}": block for i, stage in enumerate(model.stages(), 1)
                                   for j, block in enumerate(stage)}}


# -----------------------------------------------------------------------------
# WN's initialization

MIN_INIT_STD = 1e-6  # the outputs before a WN layer are standardized, so a real spread is of order 1


@torch.no_grad()
def data_dependent_init(model: nn.Module, x: torch.Tensor) -> None:
    """Salimans & Kingma 2016, section 3: in forward order, each WN layer sees the outputs of the layers
    before it, already initialized; with t = v·x/||v||, per output channel, it sets g = 1/std(t) and
    b = -mean(t)/std(t), so that its output starts at zero mean and unit variance. One forward pass does
    it: a hook standardizes each layer's output before the next layer sees it. Raises ValueError where a
    channel has no spread on x."""
    names = {m: name for name, m in model.named_modules()}

    def standardize(layer, inputs, output):
        layer.g.fill_(1.0)  # w = v / ||v||, up to eps
        if layer.bias is not None:
            layer.bias.zero_()
        t = layer.forward(*inputs).float()  # (B, C, H, W) or (B, C); forward() skips this hook
        dims = [0, *range(2, t.dim())]
        mean, std = t.mean(dims), t.std(dims, correction=0)
        flat = (std <= MIN_INIT_STD).nonzero().flatten().tolist()
        if flat:  # g = 1/std would be infinite or huge: e.g. the final linear on a batch of one image
            raise ValueError(f"{names[layer]} has no spread in {len(flat)} of its {len(std)} output channels")
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
def scale_residual_branches(model: ResNet, scale: Union[float, list]) -> None:
    """Multiply the output of the last layer of every residual branch by `scale` (its own gain and its bias:
    WN's g, scaled WS's gain; never the direction): one number, or one per stage, as recipe.residual_scales
    resolves --residual_scale, whose auto is 1/(blocks in its stage): Arpit et al. 2019's init for WN ResNets
    (victorcampos7/weightnorm-init, conv2_g_gain = 1/resblocks_per_stage). After
    the data-dependent init each branch adds unit variance to the residual stream, which grows with depth;
    scaling the branches down keeps it bounded. A scale of 0 (SkipInit, Fixup) is the worst of {0, 0.5, 1}
    on an H100 (ResNet-18, 15 epochs, 82.25 / 86.03 / 83.17% top-1); see docs/norms.md. For sws,
    docs/norms-family.md measures the same choice."""
    stages = model.stages()
    scales = scale if isinstance(scale, list) else [scale] * len(stages)
    for stage, s in zip(stages, scales, strict=True):
        for block in stage:
            end = weight_layer(getattr(block, block.branch_end))
            if end.gain is not None:
                end.gain.mul_(s)
                if end.module.bias is not None:
                    end.module.bias.mul_(s)


@torch.no_grad()
def largest_output(model: nn.Module, x: torch.Tensor) -> float:
    """max |logit| over the images x (B, 3, H, W), in eval mode, so that no running statistic moves and a few
    images are enough; the model's mode is put back."""
    training = model.training
    model.eval()
    worst = model(x).float().abs().max().item()
    model.train(training)
    return worst


# -----------------------------------------------------------------------------
# parameters and FLOPs

# thop picks a counter by exact type, so it counts our WN and WS layers as 0 MACs unless told; they expose
# `weight` (of the applied weight's shape), `bias`, `groups` and `in_features` as thop's own Conv2d and Linear
# counters expect. The weight's own reparameterization is not counted: it costs O(weight), not O(activations).
THOP_CUSTOM_OPS = {**dict.fromkeys([WNConv2d, StdConv2d, ScaledStdConv2d], thop.vision.basic_hooks.count_convNd),
                   WNLinear: thop.vision.basic_hooks.count_linear}


@functools.lru_cache(maxsize=None)
def counts(backbone_type: str, norm_type: str, num_classes: int, image_size: int, width: int) -> tuple:
    """count_params_flops of that network, once: the same for every run of a recipe, and of a pack."""
    return count_params_flops(build_model(backbone_type, norm_type, num_classes, image_size == 32, width), image_size)


def count_params_flops(model: nn.Module, image_size: int) -> tuple:
    """(parameters, thop multiply-accumulates for one image), the convention of the original table."""
    params = sum(p.numel() for p in model.parameters())
    probe = copy.deepcopy(model)  # thop adds total_ops/total_params buffers to what it profiles
    x = torch.zeros(1, 3, image_size, image_size, device=next(model.parameters()).device)
    flops, _ = thop.profile(probe, inputs=(x,), custom_ops=THOP_CUSTOM_OPS, verbose=False)
    return params, int(flops)
