"""Top-k counts and number formatting."""
import torch


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple = (1, 5)) -> torch.Tensor:
    """(B, classes), (B,) -> (len(ks),) counts of labels within each top-k, kept on the device."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices == labels[:, None]  # (B, max k)
    return torch.stack([top[:, :k].any(1).sum() for k in ks])


def human(n: float) -> str:
    """556670000 -> '556.67M', as the original table prints FLOPs."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def duration(seconds: float) -> str:
    """3725.2 -> '1:02:05'."""
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
