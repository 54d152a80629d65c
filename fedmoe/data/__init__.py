"""Client datasets: embedded data sets, each client loading only its own share.

Nothing is downloaded:

- ``digits``: scikit-learn's bundled copy of the UCI handwritten digits (1,797 8x8
  images), split over clients by flwr-datasets partitioners (IID or Dirichlet). For the
  multi-task model the labels become (digit, parity, ≥5), and with ``partial-labels``
  client p holds no label for task ``p mod 3``.
- ``pystdlib``: Python's own standard-library source, one client per top-level package
  (a natural non-IID split; :mod:`fedmoe.data.text`): byte windows for next-token
  pretraining, or the indentation level of the next line for fine-tuning.

A client splits its share into its own train and test sets.
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


def load_client_data(
    config: FedMoEConfig, partition_id: int, num_partitions: int, phase: str = "train"
) -> ClientData:
    """This client's train/test split of its share for a training ``phase`` (see
    :meth:`FedMoEConfig.phase`), deterministic in ``config.seed``."""
    if config.data == "pystdlib":
        from fedmoe.data import text

        windows = text.lm_windows if phase == "pretrain" else text.indent_windows
        data = windows(partition_id, num_partitions, seq_len=config.seq_len,
                       max_windows=config.max_windows, test_fraction=config.test_fraction,
                       seed=config.seed)
        return ClientData(data.train, data.test)
    digits = _digits(config, partition_id, num_partitions)
    if config.model != "mtmoe":
        return digits
    return ClientData(*(
        TensorDataset(x, digit_tasks(y, partition_id, num_partitions, config.partial_labels))
        for x, y in (digits.train.tensors, digits.test.tensors)
    ))


def digit_tasks(
    digits: torch.Tensor, partition_id: int, num_partitions: int, partial: bool
) -> torch.Tensor:
    """Multi-task labels (digit, parity, ≥5), (N, 3); with ``partial`` and >= 2 clients,
    client p's task ``p mod 3`` is unlabelled (:data:`fedmoe.models.tasks.MISSING`)."""
    labels = torch.stack([digits, digits % 2, (digits >= 5).long()], dim=1)
    if partial and num_partitions > 1:
        labels[:, partition_id % 3] = -1
    return labels


def _digits(config: FedMoEConfig, partition_id: int, num_partitions: int) -> ClientData:
    partitioner = _partitioner(
        config.data, config.partitioner, num_partitions, config.dirichlet_alpha, config.seed
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
