"""Per-layer statistics at the end of every epoch, on a fixed probe batch of training images: what each norm
does inside the network. A layer's ||v|| collapsing towards 0 (how WN diverged under Adam's coupled L2) shows here after
one epoch, and the activations' std through the blocks is a signal-propagation plot (Brock et al. 2021)."""
import torch
import torch.nn as nn
import torch.nn.functional as F

# One row per weight layer (kind "conv" or "linear") and per block (the stem and every residual block, kind
# "block", which has only the activation columns). Norms are over the whole tensor.
LAYER_COLUMNS = ["epoch", "layer", "kind",
                 "weight_norm",  # ||w||, the weight the layer applies (WN: g v / ||v||; WS: standardized)
                 "v_norm",  # ||v||, the direction a WN or WS layer reparameterizes; empty for the others
                 "g_mean", "g_min",  # the layer's own per-channel gains (WN's g, scaled WS's gain), or empty
                 "grad_norm",  # ||dL/d(direction)|| on the probe batch: of v for WN, of the raw weight otherwise
                 "rel_change",  # ||w - w_prev|| / ||w_prev||, w_prev the weight at the previous epoch's end
                 "act_mean", "act_std"]  # of the module's output on the probe batch


class LayerStats:
    """rows(epoch) -> that epoch's rows, from one forward and backward of the probe batch (x, y) through
    `model` in train mode: no optimizer step, no gradient left in .grad, and the buffers (BatchNorm's running
    statistics) put back, so the training trajectory is the one without statistics. Every rank computes
    them (SyncBatchNorm's forward is collective); the caller writes rank 0's.

    layers: {name: model.WeightLayer}; blocks: {name: module}, both in forward order; batch: the probe
    batch (x, y) on the device, or None (--no-layer_stats) for statistics that compute nothing."""

    def __init__(self, model: nn.Module, layers: dict, blocks: dict, batch, autocast):
        self.model, self.autocast, self.enabled = model, autocast, batch is not None
        self.layers, self.blocks = (layers, blocks) if self.enabled else ({}, {})
        self.x, self.y = batch or (None, None)
        self.reference = self.weights()

    @torch.no_grad()
    def weights(self) -> dict:
        return {name: layer.weight().detach().float().clone() for name, layer in self.layers.items()}

    def _forward_backward(self) -> tuple:
        """({name: output mean and std (2,)}, [dL/d(direction) of each layer]) on the probe batch."""
        acts = {}

        def keep(name):
            def hook(module, inputs, output):
                out = output.detach().float()
                acts[name] = torch.stack([out.mean(), out.std()])
            return hook

        modules = {**{name: layer.module for name, layer in self.layers.items()}, **self.blocks}
        hooks = [m.register_forward_hook(keep(name)) for name, m in modules.items()]
        buffers = {name: b.clone() for name, b in self.model.named_buffers()}
        training = self.model.training
        self.model.train()
        try:
            with self.autocast:
                loss = F.cross_entropy(self.model(self.x).float(), self.y)
            grads = torch.autograd.grad(loss, [layer.direction for layer in self.layers.values()])
        finally:
            for hook in hooks:
                hook.remove()
            with torch.no_grad():
                for name, b in self.model.named_buffers():
                    b.copy_(buffers[name])
            self.model.train(training)
        return acts, grads

    def rows(self, epoch: int) -> list:
        if not self.enabled:
            return []
        acts, grads = self._forward_backward()
        with torch.no_grad():
            return self._rows(epoch, acts, grads)

    def _rows(self, epoch: int, acts: dict, grads: list) -> list:
        weights = self.weights()
        w, ref, layers = list(weights.values()), [self.reference[name] for name in weights], self.layers.values()
        nan = torch.tensor(float("nan"), device=self.x.device)
        # One kernel per statistic for all the layers (torch._foreach_norm, as clip_grad_norm_ uses it): on a
        # GPU the statistics are bound by kernel launches, and their budget is 2% of an epoch.
        norm = torch._foreach_norm
        columns = {  # name -> (layers,) or, for the activations, (layers + blocks,)
            "weight_norm": torch.stack(norm(w)), "grad_norm": torch.stack(norm(grads)),
            "rel_change": torch.stack(norm(torch._foreach_sub(w, ref))) / torch.stack(norm(ref)),
            "v_norm": torch.stack([wl.direction.float().norm() if wl.reparameterized else nan for wl in layers]),
            "g_mean": torch.stack([wl.gain.float().mean() if wl.gain is not None else nan for wl in layers]),
            "g_min": torch.stack([wl.gain.float().min() if wl.gain is not None else nan for wl in layers]),
            "act_mean": torch.stack([acts[name][0] for name in [*self.layers, *self.blocks]]),
            "act_std": torch.stack([acts[name][1] for name in [*self.layers, *self.blocks]])}
        self.reference = weights
        blocks = nan.expand(len(self.blocks))  # a block has no weight of its own
        table = torch.stack([v if len(v) > len(w) else torch.cat([v, blocks]) for v in columns.values()], dim=1)
        kinds = ["linear" if wl.direction.dim() == 2 else "conv" for wl in layers] + ["block"] * len(self.blocks)
        rows = [{"epoch": epoch, "layer": name, "kind": kind, **dict(zip(columns, values))}
                for name, kind, values in zip([*self.layers, *self.blocks], kinds, table.tolist())]  # one host copy
        order = {name: i for i, (name, _) in enumerate(self.model.named_modules())}
        return sorted(rows, key=lambda r: order[r["layer"]])

    def state_dict(self) -> dict:
        return {"reference": self.reference}

    def load_state_dict(self, state: dict) -> None:
        """The reference weights of a checkpoint; the current ones for a run that had no statistics so far."""
        if self.enabled:
            self.reference = {**self.weights(), **{name: w.to(self.x.device) for name, w in state["reference"].items()}}
