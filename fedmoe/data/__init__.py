"""Client datasets: embedded data sets split over clients by flwr-datasets partitioners.

Nothing is downloaded: ``digits`` is scikit-learn's bundled copy of the UCI handwritten
digits (1,797 8x8 images). A client loads only its own partition and splits it into its
own train and test sets.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import TensorDataset

from fedmoe.config import FedMoEConfig

if TYPE_CHECKING:  # Hugging Face `datasets` is slow to import; load it only to partition.
    from datasets import Dataset
    from flwr_datasets.partitioner import Partitioner


@dataclass(frozen=True)
class ClientData:
    train: TensorDataset
    test: TensorDataset


#: (features per example, classes) of each embedded data set.
_SHAPES = {"digits": (64, 10)}


def dataset_shape(name: str) -> tuple[int, int]:
    """(in_features, num_classes) of an embedded data set, known without loading it."""
    if name not in _SHAPES:
        raise ValueError(f"unknown embedded dataset '{name}'; available: {sorted(_SHAPES)}")
    return _SHAPES[name]


def load_embedded(name: str) -> Dataset:
    """An embedded data set as a Hugging Face ``Dataset`` with ``x`` (features) and ``label``."""
    from datasets import Dataset

    if name == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        x = (bunch.data / 16.0).astype(np.float32)  # pixel intensities 0..16 -> [0, 1]
        return Dataset.from_dict({"x": x, "label": bunch.target.astype(np.int64)})
    raise ValueError(f"unknown embedded dataset '{name}'; available: ['digits']")


@lru_cache(maxsize=4)
def _partitioner(
    dataset: str, kind: str, num_partitions: int, alpha: float, seed: int
) -> Partitioner:
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    if kind == "iid":
        partitioner: Partitioner = IidPartitioner(num_partitions=num_partitions)
    elif kind == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=alpha,
            min_partition_size=10,
            self_balancing=False,
            seed=seed,
        )
    else:
        raise ValueError(f"unknown partitioner '{kind}'; available: ['iid', 'dirichlet']")
    partitioner.dataset = load_embedded(dataset)
    return partitioner


def load_client_data(config: FedMoEConfig, partition_id: int, num_partitions: int) -> ClientData:
    """This client's train/test split of its partition (deterministic in ``config.seed``)."""
    partitioner = _partitioner(
        config.dataset, config.partitioner, num_partitions, config.dirichlet_alpha, config.seed
    )
    part = partitioner.load_partition(partition_id)
    if len(part) < 2:
        raise ValueError(
            f"partition {partition_id} has {len(part)} examples; use fewer clients or a larger "
            "dirichlet-alpha"
        )
    split = part.train_test_split(test_size=config.test_fraction, seed=config.seed)
    return ClientData(_tensors(split["train"]), _tensors(split["test"]))


def _tensors(ds: Dataset) -> TensorDataset:
    x = torch.tensor(np.asarray(ds["x"], dtype=np.float32))
    y = torch.tensor(np.asarray(ds["label"], dtype=np.int64))
    return TensorDataset(x, y)
