"""The layers that make up the norms beside torch's own: weight normalization (WNConv2d, WNLinear), weight
standardization (StdConv2d, ScaledStdConv2d) and mean-only batch norm, and the roles of a conv's or linear's
parameters that the optimizer's decay, AGC, the residual scaling and the layer statistics read."""
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
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
# mean-only batch norm

class MeanOnlyBatchNorm2d(nn.Module):
    """Mean-only batch norm (Salimans & Kingma 2016, section 2.2): subtract the per-channel batch mean, or a
    running mean at eval time, then add a learned bias. After a bias-free WN conv, WN fixes the scale and
    this the shift: the paper's best CIFAR-10 result, 7.31% error against 8.46% for WN alone.

    With `synchronized` (--sync_bn under torchrun, sync_mean_only_bn) the mean is over every rank's batch, as
    SyncBatchNorm's: an all-reduce that autograd differentiates, so each rank's gradient sees the global mean.
    Every rank's batch has the same size (the loaders pad as DistributedSampler does), so the mean of the
    ranks' means is the global one."""

    def __init__(self, channels: int, momentum: float = 0.1):
        super().__init__()
        self.momentum, self.synchronized = momentum, False
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mean_only_batch_norm(x, self.running_mean, self.bias, self.training, self.momentum, self.synchronized)


def mean_only_batch_norm(x: torch.Tensor, running_mean: torch.Tensor, bias: torch.Tensor, training: bool,
                         momentum: float, synchronized: bool = False) -> torch.Tensor:
    """x (B, C, H, W) less its per-channel batch mean (the running mean, updated in place, when not training),
    plus bias (C,)."""
    if training:
        mean = x.mean(dim=(0, 2, 3), dtype=running_mean.dtype)  # (C,), at least float32: the buffer's dtype
        if synchronized:
            mean = dist_fn.all_reduce(mean) / dist.get_world_size()
        with torch.no_grad():
            running_mean.lerp_(mean, momentum)
    else:
        mean = running_mean
    return x - (mean - bias).to(x.dtype).view(1, -1, 1, 1)



def sync_mean_only_bn(model: nn.Module) -> nn.Module:
    """--sync_bn for wn_mbn: every MeanOnlyBatchNorm2d takes the mean over all ranks."""
    for module in model.modules():
        if isinstance(module, MeanOnlyBatchNorm2d):
            module.synchronized = True
    return model
