"""Adaptive gradient clipping (Brock et al. 2021b, "High-Performance Large-Scale Image Recognition Without
Normalization", section 4.1): each output unit's gradient G is clipped to at most `clipping` times its weight
W, ||G|| <= clipping * max(||W||, eps), norms per output unit. DeepMind's NFNets clip at 0.01 and never
clip the final linear; timm: --clip-grad 0.01 --clip-mode agc (timm/utils/agc.py)."""
import torch


def unitwise_norm(x: torch.Tensor) -> torch.Tensor:
    """||x|| per output unit, (out, 1, ...): over every dim but the first, of a conv's (out, in, kh, kw) or a
    linear's (out, in)."""
    return torch.linalg.vector_norm(x, dim=tuple(range(1, x.dim())), keepdim=True)


class AdaptiveGradClip:
    """clip() rescales the .grad of `params` in place, between backward and the optimizer's step; with
    clipping 0 it does nothing. params: the real parameters (not a DDP or compile wrapper's view), whose
    .grad backward has filled, all-reduced under DDP, so every rank clips alike."""
    eps = 1e-3  # the weight norm below which a unit counts as 1e-3: zero-initialized weights can still move
    tiny = 1e-6  # guards the division for a zero gradient, which clip() leaves as it is

    def __init__(self, params: list, clipping: float):
        self.params, self.clipping = (list(params) if clipping else []), clipping

    @torch.no_grad()
    def clip(self) -> None:
        params = [p for p in self.params if p.grad is not None]
        if not params:
            return
        grads = [p.grad for p in params]
        limits = [unitwise_norm(p.float()).clamp_min_(self.eps) for p in params]  # max(||W||, eps)
        norms = [unitwise_norm(g.float()).clamp_min_(self.tiny) for g in grads]  # ||G||
        # factor = min(1, clipping * max(||W||, eps) / ||G||), (out, 1, ...); torch._foreach_* as clip_grad_norm_:
        # a few kernels for all the tensors rather than a few for each
        factors = torch._foreach_div(torch._foreach_mul(limits, self.clipping), norms)
        torch._foreach_clamp_max_(factors, 1.0)
        torch._foreach_mul_(grads, [f.to(g.dtype) for f, g in zip(factors, grads)])


AGC_OFF = AdaptiveGradClip([], 0.0)  # for a train step without clipping
