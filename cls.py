"""Train and evaluate a ResNet or ResNeXt classifier with batch, instance or weight normalization.

Examples:
    python cls.py                                          # ResNet-18, bn, CIFAR-10, batch 32, 90 epochs
    python cls.py --data_name cifar100 --batch_size 2
    python cls.py --backbone_type resnext50 --norm_type wn --epochs 30
    python cls.py --data_name imagenet --data_path /home/data/imagenet/ILSVRC2012 --workers 16

Each run writes, under --results_dir, {data_name}_{backbone_type}_{norm_type}_{batch_size}_ followed by
statistics.csv (one row per epoch, rewritten after each), args.json and model.pth, and keeps its row in
summary.csv up to date.
"""
import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

import utils
from model import MODELS, NORMS, build_model


# -----------------------------------------------------------------------------
# config

class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr, not argparse's usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_name", default="cifar10", choices=list(utils.NUM_CLASSES))
    p.add_argument("--data_path", default=None,
                   help="CIFAR: the folder holding cifar-10-batches-py/ or cifar-100-python/, downloaded there "
                        "if absent (default: data); ImageNet: the folder holding train/ and val/ "
                        "(default: /home/data/imagenet/ILSVRC2012)")
    p.add_argument("--backbone_type", default="resnet18", choices=list(MODELS))
    p.add_argument("--norm_type", default="bn", choices=list(NORMS))
    p.add_argument("--batch_size", default=32, type=positive_int, help="images per optimizer step")
    p.add_argument("--epochs", default=90, type=positive_int)
    p.add_argument("--lr", default=1e-3, type=float, help="Adam's learning rate, x0.1 at 50%% and 75%% of epochs")
    p.add_argument("--weight_decay", default=5e-4, type=float, help="L2 penalty, as torch.optim.Adam applies it")
    p.add_argument("--seed", default=0, type=int)
    p.add_argument("--workers", default=8, type=int, help="DataLoader processes (ImageNet only)")
    p.add_argument("--device", default=None, help="e.g. cuda, cuda:1, cpu (default: cuda if there is one)")
    p.add_argument("--results_dir", default="results")
    args = p.parse_args(argv)
    args.data_path = args.data_path or utils.DEFAULT_DATA_PATH[args.data_name]
    return args


# -----------------------------------------------------------------------------
# one train step, one epoch, one evaluation

def train_step(model, optimizer, x, y) -> tuple:
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), utils.topk_correct(logits.detach(), y, ks=(1,))[0]


def train_one_epoch(model, loader, optimizer, device, desc: str) -> dict:
    model.train()
    sums = torch.zeros(3, device=device)  # sum of losses, correct top-1, images; summed on device, no sync
    bar = tqdm(total=loader.num_images, desc=desc, unit="img", leave=False, dynamic_ncols=True)
    for step, (x, y) in enumerate(loader):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss, correct = train_step(model, optimizer, x, y)
        sums += torch.stack([loss * len(y), correct, torch.tensor(len(y), device=device)])
        bar.update(len(y))
        if step % 25 == 0:
            loss_sum, top1, n = sums.tolist()
            bar.set_postfix(loss=f"{loss_sum / n:.3f}", top1=f"{100 * top1 / n:.2f}")
    bar.close()
    loss_sum, top1, n = sums.tolist()
    return {"loss": loss_sum / n, "top1": 100 * top1 / n}


@torch.no_grad()
def evaluate(model, loader, device) -> dict:
    model.eval()
    sums = torch.zeros(4, device=device)  # sum of losses, correct top-1, correct top-5, images
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = model(x)
        loss = F.cross_entropy(logits, y, reduction="sum")
        sums += torch.cat([loss[None], utils.topk_correct(logits, y), torch.tensor([len(y)], device=device)])
    loss_sum, top1, top5, n = sums.tolist()
    return {"loss": loss_sum / n, "top1": 100 * top1 / n, "top5": 100 * top5 / n}


def pick_device(name) -> torch.device:
    if name is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        print("notice: no CUDA device found, training on the CPU", file=sys.stderr)
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise utils.UserError(f"--device {name} is not a device name; use e.g. cuda, cuda:0 or cpu") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise utils.UserError(f"--device {name} asked for CUDA, but torch sees no CUDA device; use --device cpu")
    return device


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def main(args: argparse.Namespace) -> None:
    # -------------------------------------------------------------------------
    # setup
    device = pick_device(args.device)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    out = Path(args.results_dir)
    utils.check_writable(out)
    name = utils.run_name(args)
    files = {k: out / f"{name}_{k}" for k in ("statistics.csv", "args.json", "model.pth")}

    # -------------------------------------------------------------------------
    # data
    train_loader, test_loader = utils.build_loaders(args, device)

    # -------------------------------------------------------------------------
    # model and optimizer
    model = build_model(args.backbone_type, args.norm_type, utils.NUM_CLASSES[args.data_name],
                        cifar_stem=args.data_name != "imagenet").to(device)
    params, flops = utils.count_params_flops(model, utils.IMAGE_SIZE[args.data_name])
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    milestones = sorted({args.epochs // 2, args.epochs * 3 // 4})  # a set: at 2 epochs, one drop, not two
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)
    print(f"{name}: {params / 1e6:.2f}M params, {utils.human(flops)} FLOPs, on {device}")
    utils.write_json(vars(args), files["args.json"])

    # -------------------------------------------------------------------------
    # loop
    history = []
    summary = {**{c: getattr(args, c) for c in utils.CONFIG_COLUMNS}, "epochs": args.epochs,
               "params_m": round(params / 1e6, 2), "flops": flops, "device": device_name(device)}
    for epoch in range(1, args.epochs + 1):
        start = time.time()
        lr = optimizer.param_groups[0]["lr"]
        train_loader.set_epoch(epoch)
        train = train_one_epoch(model, train_loader, optimizer, device, f"epoch {epoch}/{args.epochs}")
        test = evaluate(model, test_loader, device)
        scheduler.step()
        history.append({"epoch": epoch, "lr": lr, "train_loss": train["loss"], "train_top1": train["top1"],
                        "test_loss": test["loss"], "test_top1": test["top1"], "test_top5": test["top5"],
                        "seconds": time.time() - start})
        stats = pd.DataFrame(history, columns=utils.EPOCH_COLUMNS)
        utils.write_csv(stats, files["statistics.csv"])
        if epoch == args.epochs:  # the weights land before the summary says "finished"
            torch.save({"model": model.state_dict(), "args": vars(args)}, files["model.pth"])
        best = stats.loc[stats.test_top1.idxmax()]
        utils.update_summary(out / "summary.csv", {
            **summary, "epochs_done": epoch, "status": "finished" if epoch == args.epochs else "incomplete",
            "best_top1": best.test_top1, "best_top5": best.test_top5,
            "final_top1": test["top1"], "final_top5": test["top5"]})
        print(f"epoch {epoch}/{args.epochs}: train loss {train['loss']:.4f} top-1 {train['top1']:.2f}% | "
              f"test loss {test['loss']:.4f} top-1 {test['top1']:.2f}% top-5 {test['top5']:.2f}%")


if __name__ == "__main__":
    try:
        main(parse_args())
    except utils.UserError as e:
        sys.exit(f"cls.py: error: {e}")
