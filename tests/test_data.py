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
