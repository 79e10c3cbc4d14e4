"""train() on a user's own Dataset: the same batches as tensors, checked alike, resumable."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

import bayessparse as bs
from bayessparse.training import Schedule, train


def toy_problem(n: int = 300):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 20, generator=g)
    return x, x[:, :3].argmax(-1)


def toy_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return bs.to_sparse_(nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 3)))


def run(net, images, labels=None, **kwargs):
    defaults = dict(
        epochs=2, batch_size=50, lr=1e-2, schedule=Schedule((0.0, 1.0)), progress=False
    )
    return train(net, images, labels, **{**defaults, **kwargs})


class Pairs(Dataset):
    """A user's dataset: one (tensor, int) pair per index, as torchvision's give."""

    def __init__(self, images, labels, bad_at=None):
        self.images, self.labels, self.bad_at = images, labels, bad_at

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        label = 7 if i == self.bad_at else int(self.labels[i])
        return self.images[i], label


def assert_same_parameters(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_a_dataset_trains_exactly_like_its_tensors(tmp_path):
    x, y = toy_problem()
    from_tensors, from_pairs, from_tensor_dataset = toy_net(), toy_net(), toy_net()
    run(from_tensors, x, y)
    history = run(from_pairs, Pairs(x, y), eval_data=(x, y))
    run(from_tensor_dataset, TensorDataset(x, y))
    assert_same_parameters(from_tensors, from_pairs)
    assert_same_parameters(from_tensors, from_tensor_dataset)
    assert history.epochs[-1]["test_error"] < 0.5


def test_a_dataset_run_resumes_exactly_and_refuses_other_data(tmp_path):
    x, y = toy_problem()
    straight = toy_net()
    run(straight, Pairs(x, y), epochs=3)
    ckpt = tmp_path / "checkpoint.pt"

    def interrupt(record):
        if record["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(toy_net(), Pairs(x, y), epochs=3, checkpoint=ckpt, on_epoch_end=interrupt)
    with pytest.raises(ValueError, match="training_data"):
        run(toy_net(), Pairs(x[:-1], y[:-1]), epochs=3, checkpoint=ckpt, resume=True)
    resumed = toy_net(seed=5)
    run(resumed, Pairs(x, y), epochs=3, checkpoint=ckpt, resume=True)
    assert_same_parameters(straight, resumed)


class Stream(IterableDataset):
    def __iter__(self):
        return iter([])


class Singles(Dataset):
    def __len__(self):
        return 3

    def __getitem__(self, i):
        return torch.zeros(20)


@pytest.mark.parametrize(
    ("images", "labels", "error", "match"),
    [
        (DataLoader(TensorDataset(*toy_problem())), None, TypeError, "loader.dataset"),
        (TensorDataset(*toy_problem()), toy_problem()[1], TypeError, "labels=None"),
        (toy_problem()[0], None, TypeError, "Dataset of \\(input, label\\) pairs"),
        (Stream(), None, TypeError, "map-style Dataset"),
        (Pairs(*toy_problem(0)), None, ValueError, "empty dataset"),
        (Singles(), None, ValueError, "\\(input, label\\) pairs, got Tensor at index 0"),
        (Pairs(*toy_problem(), bad_at=1), None, ValueError, "example 1 has label 7"),
    ],
)
def test_bad_datasets_are_refused_before_training(images, labels, error, match):
    with pytest.raises(error, match=match):
        run(toy_net(), images, labels)


def test_a_bad_label_deep_in_a_dataset_is_named_when_read():
    x, y = toy_problem()
    with pytest.raises(ValueError, match="3 outputs; example 250 has label 7"):
        run(toy_net(), Pairs(x, y, bad_at=250), epochs=1)
