"""ResNet-18/34/50 and ResNeXt-50 with a pluggable normalization: bn, in, wn, wn_mbn, gn, ws_gn or sws.

The network never asks which norm it has. `NORMS` holds, for each --norm_type, everything a norm needs: the
three factories that `build_model` threads through the stem, the blocks and the downsample path (as
torchvision's resnet.py does with `norm_layer`), its label in tables and plots, and its init:
    conv_layer(in_ch, out_ch, kernel_size, stride=1, groups=1) -> module
    norm_layer(channels) -> module
    linear_layer(in_features, out_features) -> module
Weight normalization (Salimans & Kingma 2016) changes the conv itself, so `wn` swaps in `WNConv2d` as the
conv factory and `nn.Identity` as the norm; the blocks have no branch for it, and neither do weight
standardization's convs (ws_gn, sws). Adding a norm is one entry.
"""
import copy
import math
from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional

import thop
import torch
import torch.nn as nn
import torch.nn.functional as F


# -----------------------------------------------------------------------------
# the layers by role: the optimizer's decay, AGC, the residual scaling and the layer statistics read these

@dataclass(frozen=True)
class WeightLayer:
    """A conv or linear, plain or reparameterized (WN, WS, scaled WS), by the roles of its parameters."""
    module: nn.Module
    # The weight tensor the optimizer decays and AGC clips: v for WN, the raw weight for WS, weight otherwise.
    direction: nn.Parameter
    # The layer's own per-output-channel gain, (out,): WN's g, scaled WS's gain. None for the others, whose
    # gain, if any, is the norm's affine after them.
    gain: Optional[nn.Parameter]

    @property
    def reparameterized(self) -> bool:
        """Whether the layer applies a function of `direction` rather than `direction` itself."""
        return isinstance(self.module, Reparameterized)

    def weight(self) -> torch.Tensor:
        """The weight the layer applies: g v / ||v|| for WN, the standardized weight for WS, weight otherwise."""
        return self.module.effective_weight() if self.reparameterized else self.direction


class Reparameterized:
    """Base of the convs and linears whose forward applies a function of their parameters as the weight."""

    def roles(self) -> WeightLayer:
        raise NotImplementedError

    def effective_weight(self) -> torch.Tensor:
        raise NotImplementedError


def weight_layer(module: nn.Module) -> WeightLayer:
    return module.roles() if isinstance(module, Reparameterized) else WeightLayer(module, module.weight, None)


def weight_layers(model: nn.Module) -> dict:
    """{name: WeightLayer} for every conv and linear, in forward order."""
    return {name: weight_layer(m) for name, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear, Reparameterized))}


# -----------------------------------------------------------------------------
# weight normalization

class WeightNormed(Reparameterized, nn.Module):
    """Base of the layers whose weight is w = g * v / sqrt(||v||^2 + eps) (Salimans & Kingma 2016, eq. 2).

    v has the plain layer's weight shape, (out, in/groups, kh, kw) or (out, in); g and bias are (out,).
    The norm runs over every dim but the output channel. g starts at ||v||, so at init w == v (to 1e-7) and
    the layer is its plain counterpart; the data-dependent init (section 3) overwrites g and bias later,
    which is why both are plain parameters here. eps keeps w and its gradient finite when ||v|| -> 0: the
    plain v / ||v|| has a NaN gradient at v = 0 (pytorch/pytorch#19126) and an unbounded one near it. At 1e-8
    it moves no weight of a Kaiming-initialized v (||v||^2 >= 0.09 in these nets) by more than 1e-7.
    """
    eps = 1e-8

    def __init__(self, v: torch.Tensor, bias: bool):
        super().__init__()
        self.v = nn.Parameter(v)
        self.g = nn.Parameter(self.v_norm().detach().clone())
        self.bias = nn.Parameter(torch.zeros(v.shape[0])) if bias else None

    def _v_sumsq(self) -> torch.Tensor:
        # At least float32, even under autocast or for a bf16 model: a low-precision sum of squares over
        # 4608 terms (512 x 3 x 3) keeps only about 3 significant digits.
        v = self.v.to(torch.promote_types(self.v.dtype, torch.float32))
        return v.square().sum(tuple(range(1, v.dim())), keepdim=True)  # (out, 1, ...)

    def v_norm(self) -> torch.Tensor:
        """||v|| per output channel, (out,), in float32."""
        return self._v_sumsq().sqrt().flatten()

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight g * v / sqrt(||v||^2 + eps), in v's dtype. thop's counters read its shape too."""
        sumsq = self._v_sumsq()
        scale = self.g.to(sumsq.dtype).view_as(sumsq) * torch.rsqrt(sumsq + self.eps)
        return (self.v.to(sumsq.dtype) * scale).to(self.v.dtype)

    def effective_weight(self) -> torch.Tensor:
        return self.weight

    def roles(self) -> WeightLayer:
        return WeightLayer(self, self.v, self.g)


class WNConv2d(WeightNormed):
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


class WNLinear(WeightNormed):
    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        v = nn.Linear(in_features, out_features).weight.detach()  # nn.Linear's default init
        super().__init__(v, bias)
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


# -----------------------------------------------------------------------------
# weight standardization

class StdConv2d(Reparameterized, nn.Conv2d):
    """Weight Standardization (Qiao et al. 2019): the conv applies its weight standardized per output channel,
    w = (v - mean v) / sqrt(var v + eps) over in/groups x kh x kw, v being the parameter `weight`, (out,
    in/groups, kh, kw). Followed by GroupNorm (ws_gn), it uses no batch statistics: ResNet-50 at 23.72% top-1
    error on ImageNet against BN's 23.6 and GN's 24.1 (joe-siyuan-qiao/pytorch-classification).

    One F.batch_norm over v viewed as (1, out, fan_in) computes it, as timm's StdConv2d: one fused kernel
    each way, in v's dtype (float32: autocast leaves batch_norm alone). v starts as bn's conv (torchvision's
    Kaiming init): its scale changes nothing the conv computes, only the step size relative to it. eps sits
    inside the square root, as timm's; at 1e-8 it moves no weight of these nets at init (var v >= 2e-4,
    ResNeXt's last 3x3) by more than 3e-5, where timm's 1e-6 would move it by 0.23%."""
    eps = 1e-8

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, groups: int = 1,
                 bias: bool = False):
        super().__init__(in_ch, out_ch, kernel_size, stride, kernel_size // 2, groups=groups, bias=bias)
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")

    def channel_scale(self) -> Optional[torch.Tensor]:
        """What multiplies each standardized output channel, (out,); None for 1."""
        return None

    def effective_weight(self) -> torch.Tensor:
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, weight=self.channel_scale(),
                         training=True, momentum=0.0, eps=self.eps)
        return w.reshape_as(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.effective_weight(), self.bias)

    def roles(self) -> WeightLayer:
        return WeightLayer(self, self.weight, None)


class ScaledStdConv2d(StdConv2d):
    """Scaled Weight Standardization, the conv of NF-ResNets (Brock et al. 2021a, section 3):
    w = gain * gamma * (v - mean v) / (std v * sqrt(fan_in)), fan_in = in/groups x kh x kw, gain (out,) learned
    and starting at 1. With no activation norm, it keeps the signal's scale at init: for inputs relu(z),
    z ~ N(0, s^2), a zero-mean row of variance gamma^2/fan_in gives outputs of variance
    gamma^2 Var(relu(z)) = gamma^2 s^2 (1 - 1/pi) / 2 = s^2, with gamma = sqrt(2 / (1 - 1/pi)) = 1.71286
    (DeepMind's and timm's 1.71396 is a sampled estimate of it). As in timm (ScaledStdConv2d, nfnet.py), every
    conv has gamma, the stem's too, whose input is the image: its output std starts at gamma, its ReLU's at 1."""
    gamma = math.sqrt(2 / (1 - 1 / math.pi))

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, groups: int = 1,
                 bias: bool = True):
        super().__init__(in_ch, out_ch, kernel_size, stride, groups, bias)
        self.gain = nn.Parameter(torch.ones(out_ch))

    def channel_scale(self) -> torch.Tensor:
        return self.gain * (self.gamma / math.sqrt(self.weight[0].numel()))

    def roles(self) -> WeightLayer:
        return WeightLayer(self, self.weight, self.gain)


# -----------------------------------------------------------------------------
# the other layers a norm is made of

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


# -----------------------------------------------------------------------------
# the registries: their keys are cls.py's --norm_type and --backbone_type choices

@dataclass(frozen=True)
class Norm:
    label: str  # in tables and plots
    conv_layer: Callable[..., nn.Module]
    norm_layer: Callable[[int], nn.Module]
    linear_layer: Callable[[int, int], nn.Module] = nn.Linear
    # Run once before the first step, as init(model, images, residual_scale); images() loads the batch of
    # training images (B, 3, H, W) a data-dependent init needs, and is called only by one that does.
    init: Optional[Callable[..., None]] = None


@dataclass(frozen=True)
class Backbone:
    label: str
    block: type
    layers: tuple  # blocks per stage
    groups: int = 1
    width_per_group: int = 64


def wn_init(model: nn.Module, images: Callable[[], torch.Tensor], residual_scale) -> None:
    data_dependent_init(model, images())
    scale_residual_branches(model, residual_scale)


def sws_init(model: nn.Module, images: Callable[[], torch.Tensor], residual_scale) -> None:
    """NF-ResNets' down-scaled residual branches (their alpha), as WN's init does them; no data needed."""
    scale_residual_branches(model, residual_scale)


NORMS = {
    "bn": Norm("BN", conv2d, batch_norm),
    "in": Norm("IN", conv2d, instance_norm),
    # Every conv gets a bias where bn had a BatchNorm: WN alone has no shift.
    "wn": Norm("WN", WNConv2d, no_norm, WNLinear, init=wn_init),
    "wn_mbn": Norm("WN+MBN", partial(WNConv2d, bias=False), MeanOnlyBatchNorm2d, WNLinear, init=wn_init),
    "gn": Norm("GN", conv2d, group_norm),
    "ws_gn": Norm("WS+GN", StdConv2d, group_norm),
    # No activation norm: every conv gets a bias and a gain where bn had BatchNorm's affine.
    "sws": Norm("SWS", ScaledStdConv2d, no_norm, init=sws_init),
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
def scale_residual_branches(model: ResNet, scale="auto") -> None:
    """Multiply the output of the last layer of every residual branch by `scale` (its own gain and its bias:
    WN's g, scaled WS's gain; never the direction), or with "auto" by 1/(blocks in its stage): Arpit et al.
    2019's init for WN ResNets (victorcampos7/weightnorm-init, conv2_g_gain = 1/resblocks_per_stage). After
    the data-dependent init each branch adds unit variance to the residual stream, which grows with depth;
    scaling the branches down keeps it bounded. A scale of 0 (SkipInit, Fixup) is the worst of {0, 0.5, 1}
    on an H100 (ResNet-18, 15 epochs, 82.25 / 86.03 / 83.17% top-1); see docs/norms.md. For sws,
    docs/norms-family.md measures the same choice."""
    for stage in model.stages():
        s = 1 / len(stage) if scale == "auto" else float(scale)
        for block in stage:
            end = weight_layer(getattr(block, block.branch_end))
            if end.gain is not None:
                end.gain.mul_(s)
                if end.module.bias is not None:
                    end.module.bias.mul_(s)


# -----------------------------------------------------------------------------
# parameters and FLOPs

# thop picks a counter by exact type, so it counts our WN and WS layers as 0 MACs unless told; they expose
# `weight` (of the applied weight's shape), `bias`, `groups` and `in_features` as thop's own Conv2d and Linear
# counters expect. The weight's own reparameterization is not counted: it costs O(weight), not O(activations).
THOP_CUSTOM_OPS = {**dict.fromkeys([WNConv2d, StdConv2d, ScaledStdConv2d], thop.vision.basic_hooks.count_convNd),
                   WNLinear: thop.vision.basic_hooks.count_linear}


def count_params_flops(model: nn.Module, image_size: int) -> tuple:
    """(parameters, thop multiply-accumulates for one image), the convention of the original table."""
    params = sum(p.numel() for p in model.parameters())
    probe = copy.deepcopy(model)  # thop adds total_ops/total_params buffers to what it profiles
    x = torch.zeros(1, 3, image_size, image_size, device=next(model.parameters()).device)
    flops, _ = thop.profile(probe, inputs=(x,), custom_ops=THOP_CUSTOM_OPS, verbose=False)
    return params, int(flops)
