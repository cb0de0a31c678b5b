"""The device-resident CIFAR pipeline: coverage, crops, flips, normalization and labels."""
import itertools

import pytest
import torch

from utils.data import CifarLoader, fixed_sample, resolve_path

N = 300
MEAN_STD = ((0.25, 0.5, 0.75), (0.1, 0.2, 0.3))


@pytest.fixture(scope="module")
def images():
    """Random images whose label is their index, so every output can be traced back to its source."""
    return torch.randint(0, 256, (N, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def loader(images, train=True, batch_size=64, **kwargs):
    return CifarLoader(images, torch.arange(len(images)), batch_size, MEAN_STD, train, torch.device("cpu"),
                             seed=1, **kwargs)


def denormalize(x):
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) * 255 for v in MEAN_STD)
    return x * std + mean


def epoch(loader_, epoch_=1, start_step=0):
    loader_.set_epoch(epoch_, start_step)
    batches = list(loader_)
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]), [len(y) for _, y in batches]


def find_crop(out: torch.Tensor, source: torch.Tensor):
    """(top, left, flipped) of the 32x32 window of the zero-padded source that equals out, or None."""
    padded = torch.nn.functional.pad(source.float(), (4, 4, 4, 4))
    for top, left in itertools.product(range(9), range(9)):
        window = padded[:, top:top + 32, left:left + 32]
        for flipped, candidate in ((False, window), (True, window.flip(-1))):
            if torch.equal(candidate, out):
                return top, left, flipped
    return None


def test_every_training_image_appears_once_per_epoch_and_the_last_batch_is_kept(images):
    for e in (1, 2):
        _, labels, sizes = epoch(loader(images), e)
        assert sorted(labels.tolist()) == list(range(N))
        assert sizes == [64] * 4 + [N - 256]
    assert not torch.equal(epoch(loader(images), 1)[1], epoch(loader(images), 2)[1])  # a fresh order


def test_crops_flips_and_labels(images):
    x, labels, _ = epoch(loader(images))
    assert x.shape == (N, 3, 32, 32) and x.dtype == torch.float32
    pixels = denormalize(x).round()
    found = [find_crop(pixels[i], images[labels[i]]) for i in range(N)]
    # Each is a window of the padded image its label names, or that window mirrored exactly.
    assert all(f is not None for f in found)
    tops, lefts, flips = zip(*found)
    assert set(tops) == set(range(9)) and set(lefts) == set(range(9))  # every offset of pad 4 is drawn
    assert 0.4 < sum(flips) / N < 0.6


def test_normalization_uses_the_datasets_mean_and_std(images):
    x, labels, _ = epoch(loader(images, train=False, batch_size=500))
    assert torch.equal(labels, torch.arange(N))  # evaluation keeps the order
    torch.testing.assert_close(denormalize(x), images.float(), atol=1e-3, rtol=0)
    flat = torch.tensor([[[[v * 255]] for v in MEAN_STD[0]]]).expand(2, 3, 32, 32).round().to(torch.uint8)
    centred, _, _ = epoch(loader(flat.contiguous(), train=False))
    assert centred.abs().max() < 0.5 / 255 / min(MEAN_STD[1])  # the mean maps to zero, up to uint8 rounding


def test_ranks_split_the_epoch_and_their_union_is_one_process_with_the_global_batch(images):
    _, single, single_sizes = epoch(loader(images, batch_size=64))
    shards = [epoch(loader(images, batch_size=32, rank=r, world=2)) for r in range(2)]
    for k in range(len(single_sizes)):
        union = torch.cat([shard[1][k * 32:(k + 1) * 32] for shard in shards])
        assert sorted(union.tolist()) == sorted(single[k * 64:(k + 1) * 64].tolist())
    assert shards[0][2] == shards[1][2]  # the same number of steps on every rank
    x_single, _, _ = epoch(loader(images))
    x_rank0, y_rank0, _ = shards[0]
    torch.testing.assert_close(x_rank0[:32], x_single[0:64:2])  # the same crop for the same position


def test_evaluation_shards_cover_the_split_once(images):
    labels = torch.cat([epoch(loader(images, train=False, rank=r, world=3))[1] for r in range(3)])
    assert sorted(labels.tolist()) == list(range(N))


def test_a_resumed_epoch_replays_the_rest_exactly(images):
    x, y, _ = epoch(loader(images), 3)
    x_rest, y_rest, _ = epoch(loader(images), 3, start_step=2)
    assert torch.equal(y_rest, y[128:]) and torch.equal(x_rest, x[128:])


def test_a_fixed_sample_is_the_same_for_every_call_and_not_the_first_n():
    a, b = fixed_sample(1000, 64), fixed_sample(1000, 64)
    assert torch.equal(a, b) and len(set(a.tolist())) == 64 and a.tolist() != list(range(64))
    assert torch.equal(fixed_sample(1000, 1000).sort().values, torch.arange(1000))


def test_data_path_may_name_the_cifar_folder_itself(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    assert resolve_path("cifar10", str(folder)) == str(tmp_path)
    assert resolve_path("cifar10", str(tmp_path)) == str(tmp_path)
    assert resolve_path("cifar100", None) == "data" and resolve_path("synthetic", None) is None
