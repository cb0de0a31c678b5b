"""Per-layer statistics: one row per layer and epoch, true to the weights, and invisible to training.
The resume equality of layers.csv is in test_reliability.py."""
import math

import numpy as np
import pandas as pd
import torch

from conftest import RUN, record_of, run_cls_here
from model import blocks, build_model, weight_layers
from utils.layerstats import LAYER_COLUMNS

WEIGHT_COLUMNS = ["weight_norm", "grad_norm", "rel_change", "act_mean", "act_std"]
WN_COLUMNS = ["v_norm", "g_mean", "g_min"]


def test_one_row_per_layer_and_epoch_with_finite_values(uninterrupted):
    rows = pd.read_csv(uninterrupted.record.layers_csv)
    assert list(rows.columns) == LAYER_COLUMNS
    model = build_model("resnet18", "bn", 10, width=8)
    names = [*weight_layers(model), *blocks(model)]
    order = [name for name, _ in model.named_modules() if name in names]  # forward order
    assert len(names) == 21 + 9  # 20 convs and the fc; the stem and 8 BasicBlocks
    for epoch in range(1, 5):
        assert rows[rows.epoch == epoch].layer.tolist() == order
    weights, outputs = rows[rows.kind != "block"], rows[rows.kind == "block"]
    assert set(weights.kind) == {"conv", "linear"} and len(outputs) == 4 * 9
    assert np.isfinite(weights[WEIGHT_COLUMNS].to_numpy()).all() and (weights[WEIGHT_COLUMNS[:3]] > 0).all().all()
    assert np.isfinite(outputs[["act_mean", "act_std"]].to_numpy()).all() and (outputs.act_std > 0).all()
    assert rows[WN_COLUMNS].isna().all().all()  # a bn run has no WN layers
    assert outputs[["weight_norm", "grad_norm", "rel_change"]].isna().all().all()


def test_wn_columns_match_the_saved_weights(tmp_path, data, capsys):
    flags = ["--data_path", str(data), "--norm_type", "wn", "--epochs", "2", "--batch_size", "8", "--init_images", "40"]
    status, _, err = run_cls_here(capsys, *flags, "--results_dir", str(tmp_path))
    assert status == 0, err
    record = record_of(tmp_path, *flags)
    rows = pd.read_csv(record.layers_csv)
    last = rows[(rows.epoch == 2) & (rows.kind != "block")].set_index("layer")
    model = build_model("resnet18", "wn", 10, width=8)
    model.load_state_dict(torch.load(record.weights)["model"])
    layers = weight_layers(model)
    assert set(last.index) == set(layers)
    for name, layer in layers.items():
        assert math.isclose(last.v_norm[name], layer.module.v.norm().item(), rel_tol=1e-5)
        assert math.isclose(last.g_mean[name], layer.gain.mean().item(), rel_tol=1e-5, abs_tol=1e-7)
        assert math.isclose(last.g_min[name], layer.gain.min().item(), rel_tol=1e-5, abs_tol=1e-7)
        assert math.isclose(last.weight_norm[name], layer.module.weight.norm().item(), rel_tol=1e-5)


def test_statistics_do_not_change_training(tmp_path, data, uninterrupted, capsys):
    status, _, err = run_cls_here(capsys, "--data_path", str(data), *RUN, "--no-layer_stats",
                                  "--results_dir", str(tmp_path))
    assert status == 0, err
    record = record_of(tmp_path, "--data_path", str(data), *RUN)
    assert not record.layers_csv.exists()
    without, with_stats = pd.read_csv(record.statistics), pd.read_csv(uninterrupted.record.statistics)
    pd.testing.assert_frame_equal(without.drop(columns="seconds"), with_stats.drop(columns="seconds"), check_exact=True)
