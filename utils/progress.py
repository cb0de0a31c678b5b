"""Where an epoch stands (Progress, which a checkpoint saves), and how it shows it (EpochProgress)."""
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
    """An epoch's training so far, over all ranks: per member of the pack (one member for a run alone)."""
    loss: list  # mean per image
    top1: list  # %
    stopping: bool  # a rank caught SIGINT or SIGTERM
    images: float  # the images each member's means are over

    def mean(self, members: list) -> tuple:
        """(loss, top1) averaged over these members: what the progress line shows."""
        return (sum(self.loss[k] for k in members) / max(len(members), 1),
                sum(self.top1[k] for k in members) / max(len(members), 1))


@dataclass
class Progress:
    """Where a pack of runs (or one run) stands: the epoch under way, each member's learning rate at its first
    step, the next step in it, the seconds it has taken, and this rank's sums over its steps so far, kept on
    the device so that no step waits for the host. A checkpoint holds each member's part, as a run alone's."""
    epoch: int
    lr: list
    loss: torch.Tensor  # (K,) sums of the per-image training losses
    correct: torch.Tensor  # (K,) training images whose top-1 was right
    images: torch.Tensor  # () images each member has seen
    step: int = 0
    seconds: float = 0.0

    @classmethod
    def start(cls, epoch: int, optimizers: list, device: torch.device) -> "Progress":
        k = len(optimizers)
        return cls(epoch, [o.param_groups[0]["lr"] for o in optimizers], torch.zeros(k, device=device),
                   torch.zeros(k, device=device), torch.zeros((), device=device))

    def totals(self, ctx: runtime.Context, stop_signal: int = 0) -> Totals:
        """The epoch so far, all ranks together: one all-reduce, and one copy to the host."""
        k = len(self.lr)
        sums = torch.cat([self.loss, self.correct, self.images.view(1),
                          torch.tensor([float(stop_signal)], device=self.loss.device)])
        sums = ctx.all_sum(sums).tolist()
        images, stopping = sums[2 * k:]
        return Totals([loss / max(images, 1) for loss in sums[:k]],
                      [100 * correct / max(images, 1) for correct in sums[k:2 * k]], bool(stopping), images)

    def state_dicts(self, ctx: runtime.Context) -> list:
        """For the members' checkpoints, each as a run alone's: the sums of all ranks together, which rank 0
        carries on a resume. Collective under DDP."""
        k = len(self.lr)
        sums = ctx.all_sum(torch.cat([self.loss, self.correct, self.images.view(1)])).cpu()
        return [{"epoch": self.epoch, "lr": self.lr[i], "step": self.step, "seconds": self.seconds,
                 "sums": torch.stack([sums[i], sums[k + i], sums[2 * k]])} for i in range(k)]

    @classmethod
    def from_states(cls, states: list, ctx: runtime.Context) -> "Progress":
        """The pack's progress from its members' checkpoints, which must have stopped at one step."""
        sums = torch.stack([state["sums"] for state in states]).to(ctx.device) * ctx.is_main  # (K, 3)
        first = states[0]
        return cls(first["epoch"], [state["lr"] for state in states], sums[:, 0], sums[:, 1], sums[0, 2],
                   step=first["step"], seconds=first["seconds"])


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
