import numpy as np
import torch

from fedmoe.config import FedMoEConfig
from fedmoe.data import load_client_data


def test_partitions_cover_digits_disjointly_and_are_non_iid():
    cfg = FedMoEConfig()
    rows, label_shares = [], []
    for pid in range(10):
        data = load_client_data(cfg, pid, 10)
        x = torch.cat([data.train.tensors[0], data.test.tensors[0]])
        rows.extend(map(tuple, x.mul(16).round().int().tolist()))
        counts = data.train.tensors[1].bincount(minlength=10).float()
        label_shares.append(counts.max() / counts.sum())
        assert len(data.test) >= 1 and len(data.train) > len(data.test)
    from sklearn.datasets import load_digits

    everything = [tuple(map(int, r)) for r in load_digits().data]
    assert sorted(rows) == sorted(everything)  # every image in exactly one client
    assert max(label_shares) > 0.3  # Dirichlet α=0.5: some client is dominated by one class


def test_client_data_is_deterministic():
    a = load_client_data(FedMoEConfig(), 3, 10)
    b = load_client_data(FedMoEConfig(), 3, 10)
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])


def test_pathological_split_gives_each_client_exactly_its_classes():
    cfg = FedMoEConfig(partitioner="pathological", classes_per_client=2)
    seen = set()
    for pid in range(10):
        data = load_client_data(cfg, pid, 10)
        labels = set(torch.cat([data.train.tensors[1], data.test.tensors[1]]).tolist())
        assert len(labels) == 2
        seen |= labels
    assert seen == set(range(10))  # first-deterministic: every class is used


def test_synthetic_data_set_is_fixed_and_shared_out():
    from fedmoe.data import synthetic_classification

    x, y = synthetic_classification(1000)
    x2, _ = synthetic_classification(1000)
    assert x.shape == (1000, 64) and x.dtype == np.float32 and np.array_equal(x, x2)
    assert set(np.unique(y)) == set(range(10)) and 0 <= x.min() and x.max() <= 1
    cfg = FedMoEConfig(dataset="synthetic", synthetic_samples=5000, partitioner="iid")
    sizes = [len(load_client_data(cfg, pid, 50).train) for pid in (0, 49)]
    assert all(70 <= s <= 90 for s in sizes)  # 100 examples each, 80 % to train


def test_validation_split_holds_out_part_of_train_and_never_touches_test():
    base = FedMoEConfig()
    val = base.replace(evaluate_on="validation", validation_fraction=0.25)
    plain, tuned = load_client_data(base, 2, 10), load_client_data(val, 2, 10)
    n = len(plain.train)
    assert len(tuned.test) == round(0.25 * n) and len(tuned.train) + len(tuned.test) == n
    rows = lambda d: {tuple(r) for r in d.tensors[0].tolist()}  # noqa: E731
    assert rows(tuned.train) | rows(tuned.test) == rows(plain.train)
    assert not rows(tuned.train) & rows(tuned.test)
    assert not (rows(tuned.train) | rows(tuned.test)) & rows(plain.test)
    again = load_client_data(val, 2, 10)
    assert torch.equal(again.test.tensors[0], tuned.test.tensors[0])
