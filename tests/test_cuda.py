"""The CUDA paths: bf16 autocast, channels_last, CUDA graphs (--compile auto) at a small and a large batch with
the last partial batch, fused AdamW, checkpoint and resume, and two epochs of every norm without a NaN.

Every test here is marked cuda: conftest.py deselects them on a machine without CUDA, and pytest's summary
line counts them as deselected. On a GPU they take a few minutes, most of it compiling."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

import cls
from conftest import ROOT, one_run, record_of, run_cls_here, write_cifar
from model import NORMS, WNConv2d, build_model, wn_layers
from recipe import Context, Recipe
from utils import runtime
from utils.data import build_loaders
from utils.pack import Member, Pack
from waiting import wait_until

pytestmark = pytest.mark.cuda

ON_CUDA = ["--device", "cuda", "--workers", "0"]


@pytest.fixture(autouse=True)
def fresh_compile_cache():
    torch._dynamo.reset()  # each run compiles its own graphs, as a new process would
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def learnable(tmp_path_factory):
    """512 training images a network learns within an epoch or two, 100 test images."""
    return write_cifar(tmp_path_factory.mktemp("cuda") / "data", "cifar10", n_train=512 // 5 + 1, n_test=100,
                       learnable=True)


def cuda_args(*flags):
    return one_run(*ON_CUDA, "--data_name", "synthetic", "--subset", "100", "--width", "8", *flags)


def test_bf16_autocast_channels_last_and_fused_adamw():
    args = cuda_args("--norm_type", "wn", "--batch_size", "16", "--init_images", "64")
    ctx = runtime.setup(args)
    assert ctx.device.type == "cuda" and ctx.memory_format == torch.channels_last
    recipe = Recipe.resolve(args, Context.of(args, "cuda", 1))
    assert recipe.bf16
    data = build_loaders(args, ctx)
    run = cls.build(recipe, args, ctx, data)
    assert runtime.compile_mode(args.compile, ctx) == "reduce-overhead"
    assert run.optimizer.defaults["fused"] and isinstance(run.optimizer, torch.optim.AdamW)
    convs = [m for m in run.model.modules() if isinstance(m, WNConv2d)]
    assert all(conv.v.is_contiguous(memory_format=torch.channels_last) for conv in convs if conv.v.shape[-1] > 1)
    x = torch.randn(16, 3, 32, 32, device=ctx.device).contiguous(memory_format=torch.channels_last)
    with ctx.autocast:
        assert run.model(x).dtype == torch.bfloat16
        assert all(layer.v_norm().dtype == torch.float32 for layer in wn_layers(run.model))
    y = torch.randint(0, 10, (16,), device=ctx.device)
    pack = Pack.of([Member(args, None, run)], args, ctx, data)
    for _ in range(3):  # the compiled model: warm-up, then CUDA graph replays
        loss, correct = cls.train_step(pack, x, y[:, None], ctx.autocast)
        assert torch.isfinite(loss).all() and 0 <= correct.item() <= 16


@pytest.mark.parametrize("batch_size", [2, 64])
def test_cuda_graphs_at_a_small_and_a_large_batch_with_the_last_partial_batch(tmp_path, capsys, batch_size):
    # 100 images: at batch 64 the last batch holds 36; at batch 2 every batch is full.
    flags = [*ON_CUDA, "--data_name", "synthetic", "--subset", "100", "--epochs", "2", "--batch_size", str(batch_size)]
    status, _, err = run_cls_here(capsys, *flags, "--results_dir", str(tmp_path))
    assert status == 0, err
    record = record_of(tmp_path, *flags, device="cuda")
    head = json.loads(record.args.read_text())
    assert head["compile"] == "reduce-overhead" and head["device"].startswith("cuda") and head["recipe"]["bf16"]
    stats = pd.read_csv(record.statistics)
    assert len(stats) == 2 and np.isfinite(stats[["train_loss", "test_loss"]].to_numpy()).all()


@pytest.mark.parametrize("norm", list(NORMS))
def test_every_norm_trains_two_epochs_without_nan_under_the_defaults(tmp_path, capsys, learnable, norm):
    flags = [*ON_CUDA, "--width", "64", "--data_path", str(learnable), "--norm_type", norm, "--epochs", "2"]
    status, _, err = run_cls_here(capsys, *flags, "--results_dir", str(tmp_path))
    assert status == 0, err
    record = record_of(tmp_path, *flags, device="cuda")
    stats = pd.read_csv(record.statistics)
    assert np.isfinite(stats[["train_loss", "test_loss", "test_top1"]].to_numpy()).all()
    assert stats.train_loss.iloc[-1] < stats.train_loss.iloc[0]
    layers = pd.read_csv(record.layers_csv)
    weights = layers[layers.kind != "block"]
    assert np.isfinite(weights[["weight_norm", "grad_norm", "rel_change", "act_std"]].to_numpy()).all()
    if NORMS[norm].data_init:  # WN's v keeps its norm: a collapse of ||v|| would show here
        first, last = (weights[weights.epoch == e].set_index("layer").v_norm for e in (1, 2))
        assert (last / first).min() > 0.5


def test_checkpoint_and_resume_on_cuda(tmp_path, learnable):
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    flags = [*ON_CUDA, "--width", "8", "--data_path", str(learnable), "--batch_size", "4", "--epochs", "3"]
    args = [sys.executable, str(ROOT / "cls.py"), *flags, "--results_dir", str(tmp_path)]
    record = record_of(tmp_path, *flags, device="cuda")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    wait_until(lambda: record.statistics.exists(), proc, what="the first epoch's end")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM and "--resume" in err.strip().splitlines()[-1], err[-2000:]
    checkpoint = torch.load(record.checkpoint, map_location="cpu", weights_only=False)
    first = pd.read_csv(record.statistics)
    assert checkpoint["state"]["progress"]["epoch"] == len(first) + 1 and checkpoint["state"]["rng"]["cuda"]
    resumed = subprocess.run([*args, "--resume"], capture_output=True, text=True, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    stats = pd.read_csv(record.statistics)
    assert stats.epoch.tolist() == [1, 2, 3] and np.isfinite(stats.train_loss).all()
    pd.testing.assert_frame_equal(stats.iloc[:len(first)], first)  # what was finished stays as it was
    model = build_model("resnet18", "bn", 10, width=8)
    model.load_state_dict(torch.load(record.weights, map_location="cpu")["model"])
