"""K members of one recipe trained as one network: packing.

Every conv of the packed network has K times the channels and K times the groups, so that member k's
channels see only member k's; BatchNorm, GroupNorm, InstanceNorm and mean-only BN act per channel (or per
group, within a member's channels), and the final linear per member. So the members never mix: member k's
images, side by side with the others' in the input's channels (B, K x 3, H, W), give member k's logits,
(B, K, classes), exactly as its own network would, up to the order of the sums in a grouped convolution.

Each layer's parameters are one tensor for all members, stacked along the output channels (K x out, ...), and
each member's parameter of its own network is a view of its rows, its gradient a view of the same rows of the
stacked gradient, which is kept from step to step and zeroed in place. So each member keeps a separate run's
tensors, optimizer, learning rate, checkpoint and weights; its optimizer steps its rows of the packed network
in place; and a step copies no weight, where concatenating the members' weights in every forward measured
a third slower on a 2-core CPU at width 8 and batch 2, in the backward's per-member slices above all. WN's and
WS's weights are functions of each output channel's row alone, so the packed layer's are the members'.
Running statistics are shared the same way. Parameter-free layers (ReLU, pooling, InstanceNorm without affine,
Identity) act per channel as they are.
"""
import argparse
import copy
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.board import Board
from utils.cli import UserError, flag_error
from utils.layers import MeanOnlyBatchNorm2d, WNConv2d, WNLinear, mean_only_batch_norm, weight_layer
from utils.record import RunRecord
from utils.layerstats import LayerStats
from utils.runtime import Diverged, rng_states


def rows(modules: list, stacked: torch.Tensor, put) -> None:
    """put(module k, its rows of `stacked`), the rows of (K x out, ...) being (out, ...) each."""
    size = len(stacked) // len(modules)
    for k, m in enumerate(modules):
        put(m, stacked[k * size:(k + 1) * size])


def stack_parameters(modules: list, into: nn.Module) -> None:
    """Each parameter of the modules, as one leaf of `into` holding every module's along dim 0; each module's
    parameter and its gradient become views of their rows. A parameter that is None stays None."""
    for name, first in modules[0]._parameters.items():
        if first is None:
            into.register_parameter(name, None)
            continue
        leaf = nn.Parameter(torch.cat([m._parameters[name].detach() for m in modules]))
        leaf.grad = torch.zeros_like(leaf)
        into.register_parameter(name, leaf)
        rows(modules, leaf.data, lambda m, view, name=name: setattr(m._parameters[name], "data", view))
        rows(modules, leaf.grad, lambda m, view, name=name: setattr(m._parameters[name], "grad", view))


def shared_buffer(modules: list, name: str) -> torch.Tensor:
    """One tensor holding every module's buffer `name`, of which each module's becomes a view: (K x C,)."""
    packed = torch.cat([getattr(m, name) for m in modules])
    rows(modules, packed, lambda m, view: setattr(m, name, view))
    return packed


def shell(module: nn.Module) -> nn.Module:
    """A copy of module with its attributes (stride, expansion, ...) and its forward, but no parameters,
    buffers or children of its own: a packed layer's or container's, to be filled with the packed ones."""
    out = copy.copy(module)
    out._parameters, out._buffers, out._modules = OrderedDict(), OrderedDict(), OrderedDict()
    return out


def packed_conv(convs: list) -> nn.Module:
    """K convs (plain, WN or WS) as one grouped conv of the same class, (B, K x in, H, W) -> (B, K x out, H', W'):
    a shell of the first whose parameters are the stacked ones and whose channels and groups are K times."""
    conv = shell(convs[0])
    stack_parameters(convs, conv)
    for name in ("in_channels", "out_channels", "groups"):
        setattr(conv, name, len(convs) * getattr(conv, name))
    return conv


class PackedLinear(nn.Module):
    """K final linears, one a member: (B, K x features) -> (B, K, classes)."""

    def __init__(self, linears: list):
        super().__init__()
        self.k, self.linear = len(linears), shell(linears[0])
        stack_parameters(linears, self.linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = weight_layer(self.linear).weight()  # (K x classes, features): WN's per row of its v
        weight = weight.view(self.k, -1, weight.shape[-1])
        out = torch.einsum("bkf,kcf->bkc", x.view(len(x), self.k, -1), weight)
        return out + self.linear.bias.view(self.k, -1).to(out.dtype)


class PackedBatchNorm(nn.Module):
    def __init__(self, norms: list):
        super().__init__()
        first = norms[0]
        self.momentum, self.eps, self.counters = first.momentum, first.eps, [m.num_batches_tracked for m in norms]
        stack_parameters(norms, self)
        self.register_buffer("running_mean", shared_buffer(norms, "running_mean"))
        self.register_buffer("running_var", shared_buffer(norms, "running_var"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:  # as each BatchNorm2d counts its batches
            torch._foreach_add_(self.counters, 1)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
                            self.momentum, self.eps)


class PackedGroupNorm(nn.Module):
    """K GroupNorms of G groups as one of K x G: each member's groups are its own channels."""

    def __init__(self, norms: list):
        super().__init__()
        self.groups, self.eps = norms[0].num_groups * len(norms), norms[0].eps
        stack_parameters(norms, self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.groups, self.weight, self.bias, self.eps)


class PackedMeanOnlyBatchNorm(nn.Module):
    def __init__(self, norms: list):
        super().__init__()
        self.momentum = norms[0].momentum
        stack_parameters(norms, self)
        self.register_buffer("running_mean", shared_buffer(norms, "running_mean"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mean_only_batch_norm(x, self.running_mean, self.bias, self.training, self.momentum)


def packed_instance_norm(norms: list) -> nn.InstanceNorm2d:
    """InstanceNorm without affine or running statistics, as the in norm has it, is per channel and has no
    state: one of K x C channels, which torch would warn about were it given a C-channel one."""
    first = norms[0]
    if first.affine or first.track_running_stats:
        raise TypeError("no packed form of an InstanceNorm2d with an affine or running statistics")
    return nn.InstanceNorm2d(first.num_features * len(norms), eps=first.eps)


PACKED = [((nn.Conv2d, WNConv2d), packed_conv), ((nn.Linear, WNLinear), PackedLinear),
          (nn.BatchNorm2d, PackedBatchNorm), (nn.GroupNorm, PackedGroupNorm),
          (MeanOnlyBatchNorm2d, PackedMeanOnlyBatchNorm), (nn.InstanceNorm2d, packed_instance_norm)]


def packed(modules: list) -> nn.Module:
    """The K modules, one a member, as one: a packed layer, a parameter-free layer as it is, or a container
    (a Sequential, a block, the network) of the same type whose children are packed, so that its own forward
    runs unchanged on the packed channels."""
    first = modules[0]
    for kinds, layer in PACKED:
        if isinstance(first, kinds):
            return layer(modules)
    children = list(first.named_children())
    if not children:
        if next(first.parameters(), None) is not None or next(first.buffers(), None) is not None:
            raise TypeError(f"no packed form of {type(first).__name__}, which has parameters or buffers")
        return first
    container = shell(first)
    for name, _ in children:
        setattr(container, name, packed([getattr(m, name) for m in modules]))
    return container


class PackedNet(nn.Module):
    """K member networks as one: images (B, K x 3, H, W), member k's in channels 3k to 3k + 2, to logits
    (B, K, classes). Its parameters are the stacked ones, of which the members' are views (so the members are
    not its submodules, and DDP sees each tensor once); with one member it is that member's network itself."""

    def __init__(self, members: list):
        super().__init__()
        self.k = len(members)
        self.net = packed(members) if self.k > 1 else members[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return out.unsqueeze(1) if self.k == 1 else out

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Packed, the gradients are zeroed in place: the members' gradients are views of them."""
        if self.k == 1:
            return super().zero_grad(set_to_none)
        torch._foreach_zero_([p.grad for p in self.parameters()])


class PackedLoader:
    """The members' training loaders as one: each step, every member's own next batch, in its own order and
    with its own augmentation, side by side in the channels: images (B, K x 3, H, W) and labels (B, K)."""

    def __init__(self, loaders: list):
        self.loaders = loaders
        self.batch_size, self.num_images = loaders[0].batch_size, loaders[0].num_images

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        for loader in self.loaders:
            loader.set_epoch(epoch, start_step)

    def __len__(self) -> int:
        return len(self.loaders[0])

    def __iter__(self):
        for batches in zip(*self.loaders, strict=True):
            images, labels = zip(*batches)
            yield torch.cat(images, 1), torch.stack(labels, 1)


@dataclass
class Run:
    """What a run trains: its network (as its own, unpacked), optimizer, schedule, layer statistics and AGC."""
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    layer_stats: LayerStats
    agc: object
    params: int
    flops: int

    def weights(self) -> dict:
        """The network's state dict, each tensor a copy: a packed member's tensors are views of the pack's, all
        of which torch.save would write."""
        return {k: v.clone() for k, v in self.model.state_dict().items()}

    def state(self, progress: dict) -> dict:
        """Everything a resume needs besides the record's history, as a run alone's; progress: its part of the
        pack's Progress.state_dicts."""
        return {"model": self.weights(),
                **{name: getattr(self, name).state_dict() for name in ("optimizer", "scheduler", "layer_stats")},
                "progress": progress, "rng": rng_states()}

    def load(self, state: dict, source) -> dict:
        """The run as a checkpoint's state (read from `source`) left it; returns its progress. A state that does
        not fit, as another norm's network, is refused in one line, not torch's list of every layer name."""
        part = "state"
        try:
            for part in ("model", "optimizer", "scheduler", "layer_stats"):
                getattr(self, part).load_state_dict(state[part])
            return state["progress"]
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise UserError(f"{source} does not fit this run: its {part} does not load ({type(e).__name__}), as "
                            f"with another norm's or backbone's checkpoint; move it away to start over") from None


@dataclass
class Member:
    """One run of a pack: its flags (one seed, lr and weight decay), its record, and once built, what it
    trains and what it shows TensorBoard. A member that diverges is frozen, and says why."""
    args: argparse.Namespace
    record: RunRecord
    run: Optional[Run] = None
    board: Optional[Board] = None
    diverged: Optional[str] = None

    @property
    def live(self) -> bool:
        return self.diverged is None

    def why(self) -> str:
        return (f"{self.record.name} diverged: {self.diverged}. Its {len(self.record.epochs)} finished epochs are in "
                f"{self.record.statistics}, and it is recorded as diverged")


@dataclass
class Pack:
    """Members trained together. net: their packed network (utils/pack.py); model: net as the step calls it,
    wrapped for DDP and compiled where asked; live: which members still train, on the device, (K,)."""
    members: list
    net: nn.Module
    model: nn.Module
    loader: PackedLoader
    live: torch.Tensor

    @classmethod
    def of(cls, members: list, args, ctx, data) -> "Pack":
        """The members' networks packed, wrapped as ctx (a runtime.Context) trains them, and their loaders."""
        net = PackedNet([m.run.model for m in members])
        loader = PackedLoader([data.train.reseeded(m.args.seed) for m in members])
        return cls(members, net, ctx.wrap(net, args.compile), loader,
                   torch.ones(len(members), dtype=torch.bool, device=ctx.device))

    def live_members(self) -> list:
        return [(k, m) for k, m in enumerate(self.members) if m.live]

    def live_runs(self) -> list:
        return [m.run for m in self.members if m.live]

    def freeze(self, k: int, reason: str, ctx) -> None:
        """Member k diverged: recorded as such, a result never trained again; the others go on unchanged, and
        with none left the pack ends (Diverged)."""
        member = self.members[k]
        member.record.diverge(reason)
        member.diverged, self.live[k] = reason, False
        member.board.close()
        if not self.live.any():
            raise Diverged(reason)
        ctx.log(f"{member.why()}; the others go on")


# --pack auto packs MOST runs where one run's step, batch x multiply-accumulates (MACs) an image of the forward
# pass, is at most PACKS_UP_TO[device type], and trains them one at a time above it. CPU, 2 cores, measured
# (docs/speed.md): every width-8 ResNet-18 step up to batch 32 (2.9e8 MACs) trained 1.2-3.3x faster in packs of
# 8, and from the smallest width-64 step (batch 1, 5.6e8) packing was at best 1.16x and at worst 0.38x, its
# weights outgrowing the caches. CUDA: not yet measured for packs; a guess from an H100's step times, which
# CUDA graphs keep near 2.4-3.9 ms from batch 1 to 32 of ResNet-18, so that steps up to batch 8 at full width
# (4.5e9) leave the GPU mostly idle.
PACKS_UP_TO = {"cpu": 3e8, "cuda": 5e9}
MOST = 8


def pack_size(asked, runs: int, device_type: str, batch_size: int, macs_per_image, data_name: str,
              sync_bn: bool) -> int:
    """How many runs a pack holds: --pack, or where it is auto, MOST where one run's step is small enough to pay
    (PACKS_UP_TO) and 1 where not; macs_per_image() counts the network's. ImageNet's runs (a DataLoader each)
    and --sync_bn's (no packed SyncBatchNorm) train one at a time, which --pack above 1 is refused for in one
    line."""
    if data_name == "imagenet" or sync_bn:
        if asked not in ("auto", 1) and runs > 1:
            why = "ImageNet's runs read their images by DataLoader workers" if data_name == "imagenet" else \
                "--sync_bn's batch statistics have no packed form"
            raise flag_error("--pack", f"must be 1 or auto here: {why}, so they train one at a time; got {asked}")
        return 1
    if asked != "auto":
        return asked
    return MOST if batch_size * macs_per_image() <= PACKS_UP_TO[device_type] else 1


def chunks(runs: list, size: int, point) -> list:
    """runs in lists of at most `size`, each of runs with the same point(run): where it stands."""
    at = {}
    for run in runs:
        at.setdefault(point(run), []).append(run)
    return [same[i:i + size] for same in at.values() for i in range(0, len(same), size)]
