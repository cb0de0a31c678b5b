"""Where an epoch stands (Progress, which a checkpoint saves), and how it shows it (EpochProgress)."""
import math
import sys
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from utils import runtime
from utils.metrics import duration

LOG_EVERY_FRACTION, LOG_EVERY_SECONDS = 0.1, 60.0


@dataclass
class Totals:
    """An epoch's training so far, over all ranks."""
    loss: float  # mean per image
    top1: float  # %
    stopping: bool  # a rank caught SIGINT or SIGTERM
    images: float  # the images the means are over


@dataclass
class Progress:
    """Where the run stands: the epoch under way, the learning rate of its first step, the next step in it,
    the seconds it has taken, and this rank's sums over its steps so far, kept on the device so that no
    step waits for the host."""
    epoch: int
    lr: float
    loss: torch.Tensor  # sum of the per-image training losses
    correct: torch.Tensor  # training images whose top-1 was right
    images: torch.Tensor
    step: int = 0
    seconds: float = 0.0

    @classmethod
    def start(cls, epoch: int, optimizer: torch.optim.Optimizer, device: torch.device) -> "Progress":
        return cls(epoch, optimizer.param_groups[0]["lr"], *torch.zeros(3, device=device).unbind())

    def totals(self, ctx: runtime.Context, stop_signal: int = 0) -> Totals:
        """Raises runtime.Diverged on a NaN or infinite loss: the one place that looks."""
        sums = torch.stack([self.loss, self.correct, self.images, torch.tensor(float(stop_signal), device=ctx.device)])
        loss, correct, images, stopping = ctx.all_sum(sums).tolist()
        if not math.isfinite(loss):
            raise runtime.Diverged(f"loss became {loss} in epoch {self.epoch} by step {self.step}")
        return Totals(loss / max(images, 1), 100 * correct / max(images, 1), bool(stopping), images)

    def state_dict(self, ctx: runtime.Context) -> dict:
        """For a checkpoint: the sums of all ranks together, which rank 0 carries on a resume."""
        sums = ctx.all_sum(torch.stack([self.loss, self.correct, self.images]))
        return {"epoch": self.epoch, "lr": self.lr, "step": self.step, "seconds": self.seconds, "sums": sums.cpu()}

    @classmethod
    def from_state(cls, state: dict, ctx: runtime.Context) -> "Progress":
        sums = state["sums"].to(ctx.device) * ctx.is_main
        return cls(state["epoch"], state["lr"], *sums.unbind(), step=state["step"], seconds=state["seconds"])


class EpochProgress:
    """A tqdm bar on a terminal, and in a log (nohup, SLURM) a line at every 10% of the epoch or every minute,
    whichever comes first: tqdm is wrong for logs, since it redraws its bar with carriage returns, which a
    log file keeps as one endless line, and it prints on a clock, not at fractions. update(images, loss,
    top1) after every step that synced with the host; nothing at all when disabled."""

    def __init__(self, epoch: int, epochs: int, total: int, done: int, enabled: bool):
        self.stream = sys.stdout
        self.enabled, self.epoch, self.epochs, self.total = enabled, epoch, epochs, total
        self.start_images, self.start_time = done, time.time()
        self.last_line_images, self.last_line_time = done, self.start_time
        self.bar = None
        if enabled and self.stream.isatty():
            self.bar = tqdm(total=total, initial=done, desc=f"epoch {epoch}", unit="img", leave=False,
                            dynamic_ncols=True, file=self.stream)

    def update(self, images: int, loss: float, top1: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(images - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.3f}", top1=f"{top1:.2f}")
            return
        now = time.time()
        if (images - self.last_line_images >= LOG_EVERY_FRACTION * self.total
                or now - self.last_line_time >= LOG_EVERY_SECONDS):
            rate = (images - self.start_images) / max(now - self.start_time, 1e-9)
            eta = duration((self.total - images) / rate) if rate > 0 else "?"
            print(f"epoch {self.epoch}/{self.epochs} {100 * images / self.total:3.0f}% "
                  f"({images}/{self.total} images): {rate:.1f} images/s, loss {loss:.4f}, top-1 {top1:.2f}%, "
                  f"epoch ETA {eta}", file=self.stream, flush=True)
            self.last_line_images, self.last_line_time = images, now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
