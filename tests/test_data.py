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


# ---------------------------------------------------------------- the split, once
import math

import numpy as np
import pytest

from fedmoe.data import (
    MIN_CLIENT_EXAMPLES,
    DataSplitError,
    check_split,
    load_embedded,
    partition_indices,
    split_sizes,
)

DIGITS = 1797


def test_a_partition_is_a_pure_function_of_its_arguments():
    """Fresh computations (no cache) agree, for a split that succeeds and one that fails;
    before, a cached partitioner failed on the first requests and succeeded on later ones."""
    compute = partition_indices.__wrapped__
    first, second = compute("digits", "dirichlet", 10, 0.5, 7), compute("digits", "dirichlet", 10, 0.5, 7)
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    assert not all(np.array_equal(a, b) for a, b in
                   zip(first, compute("digits", "dirichlet", 10, 0.5, 8), strict=True))
    messages = set()
    for _ in range(3):  # an impossible split stays impossible, with the same message
        with pytest.raises(DataSplitError) as err:
            partition_indices("digits", "dirichlet", 30, 0.1, 42)
        messages.add(str(err.value))
    assert len(messages) == 1


def test_a_clients_data_is_its_rows_of_the_split():
    cfg = FedMoEConfig()
    rows = partition_indices("digits", "dirichlet", 10, 0.5, 42)[4]
    data = load_client_data(cfg, 4, 10)
    x = load_embedded("digits")["x"]
    mine = {tuple(np.round(np.asarray(x[int(r)]) * 16).astype(int)) for r in rows}
    got = torch.cat([data.train.tensors[0], data.test.tensors[0]]).mul(16).round().int()
    assert {tuple(r) for r in got.tolist()} == mine
    assert (len(data.train), len(data.test)) == split_sizes(len(rows), cfg.test_fraction)


@pytest.mark.parametrize("n", [2, 3, 9, 10, 11, 37, 101])
@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.5, 0.91])
def test_split_sizes_are_hugging_faces(n, fraction):
    from datasets import Dataset

    if math.ceil(fraction * n) >= n:
        return  # Hugging Face refuses an empty train split; check_split does too (below)
    split = Dataset.from_dict({"a": list(range(n))}).train_test_split(test_size=fraction, seed=0)
    assert split_sizes(n, fraction) == (len(split["train"]), len(split["test"]))


def test_the_largest_possible_number_of_clients_is_checked_before_the_run():
    most = DIGITS // MIN_CLIENT_EXAMPLES  # 179 clients of >= 10 digits each
    sizes = check_split(FedMoEConfig(partitioner="iid"), most)
    assert len(sizes) == most and sum(a + b for a, b in sizes) == DIGITS
    assert min(a + b for a, b in sizes) >= MIN_CLIENT_EXAMPLES
    for partitioner in ("iid", "dirichlet"):
        with pytest.raises(DataSplitError, match=f"at most {most} clients fit") as err:
            check_split(FedMoEConfig(partitioner=partitioner), most + 1)
        assert "alpha" not in str(err.value)  # not an α problem: no amount of α fixes it


@pytest.mark.parametrize(("samples", "clients", "says"), [
    (15, 2, "2 clients: .*synthetic.csv has 15 examples, .* so at most 1 client fits; use fewer "
            "clients or a bigger data set"),
    (25, 3, "so at most 2 clients fit;"),
])
def test_too_small_a_data_set_says_how_many_clients_fit_in_plain_words(tmp_path, samples,
                                                                      clients, says):
    path = tmp_path / "synthetic.csv"  # a user's file of `samples` rows
    path.write_text("a,b,label\n" + "".join(f"{i},{i % 3},{i % 2}\n" for i in range(samples)))
    with pytest.raises(DataSplitError, match=says):
        check_split(FedMoEConfig(dataset=f"csv:{path}", partitioner="iid"), clients)


def test_a_skewed_split_names_alpha_and_an_iid_split_never_does():
    with pytest.raises(DataSplitError, match="dirichlet-alpha=0.1.*use a larger dirichlet-alpha"):
        check_split(FedMoEConfig(dirichlet_alpha=0.1), 30)
    sizes = check_split(FedMoEConfig(dirichlet_alpha=0.1), 5)
    assert min(a + b for a, b in sizes) >= MIN_CLIENT_EXAMPLES
    with pytest.raises(DataSplitError) as err:
        check_split(FedMoEConfig(partitioner="iid", test_fraction=0.95), 179)
    assert "no training example" in str(err.value) and "alpha" not in str(err.value)
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
