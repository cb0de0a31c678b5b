"""A run's optimizer, with its parameter groups by role, its adaptive gradient clipping and its learning-rate
schedule: the recipe's optimizer, --weight_decay, --agc, --lr_schedule and --warmup_epochs, at its peak lr."""
import math

import torch
import torch.nn as nn

from model import weight_layers
from recipe import Recipe
from utils.agc import AdaptiveGradClip


def make_optimizer(model: nn.Module, recipe: Recipe, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (decoupled decay, Loshchilov & Hutter 2019) or Adam (L2 added to the gradient, the original's) at
    the recipe's peak lr, with parameters grouped by role as timm's param_groups_weight_decay: the decay acts
    on conv and linear weights (WN's v and WS's raw weight among them), never on gains (WN's g, scaled WS's
    gain, norm affines) or biases, as DeepMind's NFNet optimizer. Under Adam's coupled L2, the weight of a
    layer with its own gain (WN's v, scaled WS's weight) is left undecayed too: w depends on v / ||v|| only,
    so L2 changes nothing the loss sees, and Adam scales it to a step of about lr per element, which
    collapses ||v|| where the loss gives v no gradient (g = 0) and makes the gradient through g v / ||v||
    explode once g moves: WN went NaN this way on an H100 (docs/recipe.md)."""
    decayed = {id(layer.direction) for layer in weight_layers(model).values()
               if recipe.optimizer == "adamw" or layer.gain is None}
    params = list(model.parameters())
    groups = [{"params": [p for p in params if id(p) in decayed], "weight_decay": recipe.weight_decay},
              {"params": [p for p in params if id(p) not in decayed], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW if recipe.optimizer == "adamw" else torch.optim.Adam
    # Fused: one kernel for a group's tensors, on the CPU too (torch >= 2.4), where the step of four width-8
    # ResNet-18s took 1.5 ms against 5.1 ms with foreach and 7.1 ms tensor by tensor (2-core CPU).
    return optimizer(groups, lr=recipe.peak_lr(), fused=True)


def make_agc(model: nn.Module, recipe: Recipe) -> AdaptiveGradClip:
    """AGC (--agc) on every conv's weight tensor, WN's v and WS's raw weight among them, by role as the
    optimizer's groups: not on gains, biases or norm affines, and never on the final linear, which Brock et
    al. 2021b (section 4.1) found better left unclipped."""
    layers = weight_layers(model).values()
    return AdaptiveGradClip([layer.direction for layer in layers if layer.module is not model.fc], recipe.agc)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """The learning rate of step `step` (0-based, of `total`) as a fraction of the peak: a linear warmup to 1
    over the first `warmup` steps, then a cosine to 0 at the end of the run, or x0.1 at 50% and at 75% of it."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "step":
        return 0.1 ** sum(step >= int(total * f) for f in (0.5, 0.75))
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def make_scheduler(optimizer, recipe: Recipe, steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    # One pure function of the step inside torch's LambdaLR: exact at any step, so a resumed run replays it,
    # where chaining LinearLR and CosineAnnealingLR in SequentialLR computes the cosine recursively.
    total, warmup = recipe.epochs * steps_per_epoch, round(recipe.warmup_epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(optimizer,
                                             lambda step: lr_factor(step, total, warmup, recipe.lr_schedule))
