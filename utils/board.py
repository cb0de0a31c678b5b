"""A live view of a run in TensorBoard: `tensorboard --logdir results` (docs/tensorboard.md).

A run's events go into its own folder, {results_dir}/{recipe}/seed{N}/, one file per process that trained it,
so TensorBoard names the run {recipe}/seed{N}. The x axis of every curve is the global step: training steps
done, (epoch - 1) x steps per epoch + step in the epoch."""
import math
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from utils.cli import UserError
from utils.progress import Progress, Totals
from utils.files import os_error

FLUSH_SECS = 30  # the longest a point waits in memory before TensorBoard can see it; every epoch end flushes too


@dataclass
class SoFar:
    """One run's training in the epoch so far, all ranks together: its mean loss and top-1 (%) over images."""
    loss: float
    top1: float
    images: float


class Board:
    """What the loop shows TensorBoard, through three calls: step() at the host syncs the epoch already makes
    (never one of its own), epoch() at every epoch's end, close() (or the end of a with block). Disabled
    (--no-tensorboard, or a DDP rank other than 0), it writes nothing and imports nothing.

    A resumed run writes a new file in the same folder, which begins with SummaryWriter's purge_step: TensorBoard
    then hides the points earlier processes wrote after the step resumed from, which a process killed before
    its checkpoint leaves behind, so every curve holds each step once. A run that starts from its first step
    hides all earlier points.

    progress: where the run's pack starts, of which the run is member `member` (0 for a run alone); layers:
    {name: model.WeightLayer}, whose own per-channel gains (WN's g, scaled WS's gain) it draws as histograms;
    recipe: {flag: value}, which a run that starts from its first step shows as a table."""

    def __init__(self, path: Path, enabled: bool, steps_per_epoch: int, progress: Progress, layers: dict,
                 recipe: dict, member: int = 0):
        self.enabled, self.writer, self.path, self.member = enabled, None, path, member
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard, or pass "
                            "--no-tensorboard") from None
        self.steps_per_epoch = steps_per_epoch
        self.gains = {name: layer.gain for name, layer in layers.items() if layer.gain is not None}
        start = self.global_step(progress.epoch, progress.step)
        # The sums of the epoch so far, at the last point: each point is the mean of the steps since the last one.
        # On a resume mid-epoch rank 0 holds every rank's sums (Progress.from_states); one host copy per run.
        loss, correct, images = torch.stack([progress.loss[member], progress.correct[member], progress.images]).tolist()
        self.last = SoFar(loss / max(images, 1), 100 * correct / max(images, 1), images)
        self.excepthook, threading.excepthook = threading.excepthook, self._writer_thread_error
        try:
            with self._writing():
                self.writer = SummaryWriter(str(path), purge_step=start + 1 if start else 0, flush_secs=FLUSH_SECS)
                if not start:
                    table = "\n".join(f"| {k} | {str(v).replace('|', '&#124;')} |" for k, v in recipe.items())
                    self.writer.add_text("recipe", f"| flag | value |\n|---|---|\n{table}", 0)
        except BaseException:
            self.__exit__(True)
            raise

    @contextmanager
    def _writing(self):
        """Around every call into the writer: a full disk, or a folder that cannot be written, is one line."""
        try:
            yield
        except Exception as e:
            cause = os_error(e)
            if cause is None:
                raise
            raise UserError(f"cannot write TensorBoard's events in {self.path} ({cause.strerror}); free space or "
                            f"pick another --results_dir, or pass --no-tensorboard") from None

    def _writer_thread_error(self, args) -> None:
        """threading.excepthook while the writer is open. TensorBoard's writer thread keeps the error that ends it
        (a full disk) and raises it again at the next call into the writer, where _writing makes it one line;
        its traceback printed from the thread as well would be a second report, so that one is left out."""
        if not (type(args.thread).__module__.startswith("tensorboard.") and os_error(args.exc_value)):
            self.excepthook(args)

    def global_step(self, epoch: int, step: int) -> int:
        """Training steps done by `step` steps into `epoch` (1-based)."""
        return (epoch - 1) * self.steps_per_epoch + step

    def step(self, progress: Progress, totals: Totals, lr: float) -> None:
        """train/loss and train/top1: the means over the images since the previous point, all ranks together;
        train/lr: the learning rate of the next step. totals: the epoch so far, as Progress.totals gives it."""
        if not self.enabled:
            return
        now, last = SoFar(totals.loss[self.member], totals.top1[self.member], totals.images), self.last
        images = now.images - last.images
        if images > 0:
            step = self.global_step(progress.epoch, progress.step)
            loss = (now.loss * now.images - last.loss * last.images) / images
            top1 = (now.top1 * now.images - last.top1 * last.images) / images
            with self._writing():
                self.writer.add_scalar("train/loss", loss, step)
                self.writer.add_scalar("train/top1", top1, step)
                self.writer.add_scalar("train/lr", lr, step)
        self.last = now

    def epoch(self, row, layer_rows: list) -> None:
        """At the end of epoch row.epoch: its test metrics (a record.EpochRow), the layer statistics as one
        scalar per statistic and layer (LAYER_COLUMNS; no point where a layer has no such value), and the
        distribution of each layer's own gain over its output channels."""
        if not self.enabled:
            return
        step = row.epoch * self.steps_per_epoch
        with self._writing():
            for split in ("test", "val"):  # val: where the run holds out a validation split
                for name in ("loss", "top1", "top5"):
                    if getattr(row, f"{split}_{name}") is not None:
                        self.writer.add_scalar(f"{split}/{name}", getattr(row, f"{split}_{name}"), step)
            for r in layer_rows:
                for stat, value in r.items():
                    if stat not in ("epoch", "layer", "kind") and not math.isnan(value):
                        self.writer.add_scalar(f"{stat}/{r['layer']}", value, step)
            if self.gains:  # one host copy for all the layers
                gains = torch.cat([g.detach().float().flatten() for g in self.gains.values()]).cpu()
                for layer, g in zip(self.gains, gains.split([g.numel() for g in self.gains.values()])):
                    self.writer.add_histogram(f"g/{layer}", g, step)
            self.last = SoFar(0.0, 0.0, 0)  # the next epoch's sums start from zero
            self.writer.flush()

    def close(self) -> None:
        writer, self.writer = self.writer, None
        try:
            if writer is not None:
                with self._writing():
                    writer.close()
        finally:
            if self.enabled:
                threading.excepthook = self.excepthook

    def __enter__(self) -> "Board":
        return self

    def __exit__(self, exc_type, *exc_info) -> None:
        try:
            self.close()
        except UserError:
            if exc_type is None:
                raise  # else the error that ends the run says what went wrong, in its one line
