"""Client datasets: embedded data sets, each client loading only its own share.

Nothing is downloaded:

- ``digits``: scikit-learn's bundled copy of the UCI handwritten digits (1,797 8x8
  images), split over clients by flwr-datasets partitioners (IID, Dirichlet, or
  pathological: ``classes-per-client`` classes each). For the
  multi-task model the labels become (digit, parity, ≥5), and with ``partial-labels``
  client p holds no label for task ``p mod 3``.
- ``pystdlib``: Python's own standard-library source, one client per top-level package
  (a natural non-IID split; :mod:`fedmoe.data.text`): byte windows for next-token
  pretraining, or the indentation level of the next line for fine-tuning.
- ``synthetic``: a generated classification set for runs at scale (scikit-learn's
  ``make_classification``: ``synthetic-samples`` examples, 64 features, 10 classes; the
  same set for every seed), split over clients like digits.

Users' own data (:mod:`fedmoe.data.files`): ``dataset = "csv:PATH"`` (or ``npz:``,
``images:``, ``hf:``) is split over simulated clients like digits; in a deployment each
SuperNode reads its own file (``data-path`` in its node config, :func:`load_node_data`)
and splits it into its own train and test sets.

A client splits its share into its own train and test sets; with ``evaluate-on =
"validation"`` it holds out part of its train set as a validation set that takes the test
set's place (:func:`validation_split`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import TensorDataset

from fedmoe.config import EMBEDDED_SHAPE, ConfigError, FedMoEConfig
from fedmoe.data.files import DataFileError, check_shape, infer_spec, load_file, scale_warning

if TYPE_CHECKING:  # Hugging Face `datasets` is slow to import; load it only to partition.
    from datasets import Dataset
    from flwr_datasets.partitioner import Partitioner


@dataclass(frozen=True)
class ClientData:
    train: TensorDataset
    test: TensorDataset


#: Shape of the generated ``synthetic`` data set: features per example, classes.
SYNTHETIC_FEATURES, SYNTHETIC_CLASSES = 64, 10


def load_embedded(name: str, synthetic_samples: int = 20000,
                  label_column: str = "label", feature_bounds: str = "") -> Dataset:
    """An embedded data set, or a user's data file ``KIND:PATH``
    (:func:`fedmoe.data.files.load_file`, scaled by ``feature_bounds``), as a Hugging Face
    ``Dataset`` with ``x`` (features) and ``label``.

    Raises
    ------
    DataFileError
        For a data file that cannot be used (naming the file and the fix).
    """
    from datasets import Dataset

    if ":" in name:
        arrays = load_file(name, label_column, feature_bounds)
        return Dataset.from_dict({"x": arrays.x, "label": arrays.y})
    if name == "synthetic":
        x, y = synthetic_classification(synthetic_samples)
        return Dataset.from_dict({"x": x, "label": y})

    if name == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        x = (bunch.data / 16.0).astype(np.float32)  # pixel intensities 0..16 -> [0, 1]
        return Dataset.from_dict({"x": x, "label": bunch.target.astype(np.int64)})
    raise ValueError(f"unknown embedded dataset '{name}'; available: ['digits', 'synthetic']")


def synthetic_classification(samples: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``synthetic`` data set: x (samples, 64) float32 scaled to [0, 1] like digits'
    pixels, labels (samples,) int64 in 0..9. Fixed generator seed: one data set, whatever
    the run's seed (which only changes the split and the training)."""
    from sklearn.datasets import make_classification

    x, y = make_classification(
        n_samples=samples, n_features=SYNTHETIC_FEATURES, n_informative=24, n_redundant=8,
        n_classes=SYNTHETIC_CLASSES, n_clusters_per_class=2, class_sep=1.5, flip_y=0.01,
        random_state=0,
    )
    x = (x - x.min(axis=0)) / (x.max(axis=0) - x.min(axis=0))
    return x.astype(np.float32), y.astype(np.int64)


@lru_cache(maxsize=4)
def _source(name: str, synthetic_samples: int = 20000, label_column: str = "label",
            feature_bounds: str = "") -> Dataset:
    """:func:`load_embedded`, loaded once per process (every client message reads it)."""
    return load_embedded(name, synthetic_samples, label_column, feature_bounds)


#: The fewest examples a client may hold (train + test): below it a client has too little
#: to train and test on, and the Dirichlet partitioner redraws until every client has it.
MIN_CLIENT_EXAMPLES = 10
#: Draws flwr-datasets' DirichletPartitioner makes before it gives up (its own constant).
DIRICHLET_DRAWS = 11


class DataSplitError(ConfigError):
    """The data set cannot be split over the clients as asked; the message names the fix."""


@lru_cache(maxsize=8)
def partition_indices(
    dataset: str, kind: str, num_partitions: int, alpha: float, seed: int,
    classes_per_client: int = 2, synthetic_samples: int = 20000, label_column: str = "label",
) -> tuple[np.ndarray, ...]:
    """Row indices of every client's share of ``dataset``: a pure function of its arguments.

    A fresh flwr-datasets partitioner computes the whole split once per call (its generator
    starts from ``seed`` every time), so every process — the driver that checks the split,
    each simulated client — gets the same answer; only the result is cached, never a
    partitioner (whose generator would draw a different split on a second attempt).

    Returns
    -------
    tuple of np.ndarray
        ``num_partitions`` arrays of row indices (int64), in the partitioner's order.

    Raises
    ------
    DataSplitError
        If some client would hold fewer than :data:`MIN_CLIENT_EXAMPLES` examples (for a
        Dirichlet split: in every one of its draws), with the cause and the fix.
    """
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        PathologicalPartitioner,
    )

    data = _source(dataset, synthetic_samples, label_column)
    size = len(data)
    if num_partitions * MIN_CLIENT_EXAMPLES > size:
        fit = size // MIN_CLIENT_EXAMPLES  # >= 1: a source holds >= MIN examples (files
        # with fewer are refused as they are read, the built-in sets are larger)
        most = "at most 1 client fits" if fit == 1 else f"at most {fit:,} clients fit"
        raise DataSplitError(
            f"{num_partitions:,} clients: {dataset} has {size:,} examples, and each client "
            f"needs at least {MIN_CLIENT_EXAMPLES} (its own train and test split), so "
            f"{most}; use fewer clients or a bigger data set"
        )
    data = data.add_column("row", np.arange(size, dtype=np.int64))
    if kind == "pathological":
        partitioner: Partitioner = PathologicalPartitioner(
            num_partitions=num_partitions, partition_by="label",
            num_classes_per_partition=classes_per_client,
            class_assignment_mode="first-deterministic", seed=seed,
        )
    elif kind == "iid":
        partitioner = IidPartitioner(num_partitions=num_partitions)
    elif kind == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions, partition_by="label", alpha=alpha,
            min_partition_size=MIN_CLIENT_EXAMPLES, self_balancing=False, seed=seed,
        )
    else:
        raise ValueError(f"unknown partitioner '{kind}'; available: "
                         "['iid', 'dirichlet', 'pathological']")
    partitioner.dataset = data
    try:
        with warnings.catch_warnings():  # one warning per failed draw: the error says it all
            warnings.simplefilter("ignore", UserWarning)
            parts = [np.asarray(partitioner.load_partition(i)["row"], dtype=np.int64)
                     for i in range(num_partitions)]
    except ValueError as err:
        if kind == "pathological":
            raise DataSplitError(
                f"the pathological split of {dataset} over {num_partitions:,} clients with "
                f"classes-per-client={classes_per_client} failed: {err}; use fewer "
                "classes-per-client or fewer clients") from None
        if kind != "dirichlet":
            raise
        raise DataSplitError(
            f"the Dirichlet split of {dataset} ({size:,} examples) over {num_partitions:,} "
            f"clients with dirichlet-alpha={alpha:g} (seed {seed}) left some client with fewer "
            f"than {MIN_CLIENT_EXAMPLES} examples in all {DIRICHLET_DRAWS} draws; use a larger "
            f"dirichlet-alpha, fewer clients, or partitioner='iid'"
        ) from None
    small = [(i, len(p)) for i, p in enumerate(parts) if len(p) < MIN_CLIENT_EXAMPLES]
    if small:  # the guard above makes this impossible for iid and dirichlet: say so if not
        raise DataSplitError(
            f"the {kind} split of {dataset} gives {len(small)} client(s) fewer than "
            f"{MIN_CLIENT_EXAMPLES} examples (client {small[0][0]}: {small[0][1]}); use fewer "
            "clients"
        )
    return tuple(parts)


def split_sizes(num_examples: int, test_fraction: float) -> tuple[int, int]:
    """(train, test) sizes of a client's share: Hugging Face's ``train_test_split`` rule
    (``test = ceil(test-fraction · n)``, the rest trains)."""
    num_test = math.ceil(test_fraction * num_examples)
    return num_examples - num_test, num_test


def check_split(config: FedMoEConfig, num_partitions: int) -> list[tuple[int, int]]:
    """Compute and check the run's split once, before anything starts: every client's
    (train, test) size. Digits and synthetic (the text corpus is split by package).

    Raises
    ------
    DataSplitError
        If the split is impossible or leaves a client without a train or a test example.
    """
    if config.data in ("pystdlib", "node"):
        return []
    parts = _partition(config, num_partitions)
    sizes = [split_sizes(len(p), config.test_fraction) for p in parts]
    empty = [i for i, (train, test) in enumerate(sizes) if train < 1 or test < 1]
    if empty:
        n = len(parts[empty[0]])
        raise DataSplitError(
            f"test-fraction={config.test_fraction:g} leaves {len(empty)} client(s) with no "
            f"training example (client {empty[0]} holds {n}: {sizes[empty[0]][1]} test); use "
            "a smaller test-fraction or fewer clients"
        )
    return sizes


def _partition(config: FedMoEConfig, num_partitions: int) -> tuple[np.ndarray, ...]:
    """The run's split (:func:`partition_indices` with the config's data keys)."""
    return partition_indices(config.data, config.partitioner, num_partitions,
                             config.dirichlet_alpha, config.seed, config.classes_per_client,
                             config.synthetic_samples, config.label_column)


def with_data_shape(config: FedMoEConfig) -> FedMoEConfig:
    """``config`` with ``num-features``/``num-classes`` filled in from its data file (a
    ``KIND:PATH`` dataset; other data sets are returned as they are), checked against any
    value the user gave.

    Raises
    ------
    DataFileError
        If the file cannot be used or does not fit the given shape.
    """
    if not config.is_file_data:
        return config
    arrays = load_file(config.dataset, config.label_column, config.feature_bounds)
    features = config.num_features or arrays.num_features
    classes = config.num_classes or max(arrays.num_classes, 2)
    check_shape(config.dataset.partition(":")[2], arrays, features, classes)
    return config.replace(num_features=features, num_classes=classes)


def model_shape(config: FedMoEConfig) -> tuple[int, int]:
    """(input features, classes) of a classification run's model."""
    return (config.num_features or EMBEDDED_SHAPE[0], config.num_classes or EMBEDDED_SHAPE[1])


class DataScaleWarning(UserWarning):
    """A data file's features are far from unit scale and no ``feature-bounds`` is given,
    or its bounds clip many values (:func:`fedmoe.data.files.scale_warning`)."""


@lru_cache(maxsize=64)
def _warn_once(message: str) -> None:
    """Issue a :class:`DataScaleWarning` once per process (every message reloads the data)."""
    warnings.warn(message, DataScaleWarning, stacklevel=3)


def load_node_data(config: FedMoEConfig, data_path: str, label_column: str = "",
                   *, seed_offset: int = 0) -> ClientData:
    """A SuperNode's own data file (``data-path`` in its node config; ``KIND:PATH``, or a
    path whose kind is inferred, :func:`fedmoe.data.files.infer_spec`), checked against the
    run's model and split into its own train and test sets (``test-fraction``, seeded by the
    run's seed; with ``evaluate-on = "validation"`` as :func:`load_client_data`).

    Raises
    ------
    DataFileError
        If the file cannot be used or does not fit the model (naming the file and the fix).
    """
    if config.data in ("pystdlib",) or config.model == "mtmoe":
        raise DataFileError(f"data-path {data_path}: this run's model '{config.model}' does "
                            "not train on users' data files; use lmoe, moe or hmoe")
    spec = infer_spec(data_path)
    arrays = load_file(spec, label_column or config.label_column, config.feature_bounds)
    as_read = load_file(spec, label_column or config.label_column) if config.feature_bounds \
        else arrays  # (cached) before the bounds' map, which the warning judges
    if warning := scale_warning(spec, as_read, config.feature_bounds):
        _warn_once(warning)
    check_shape(spec.partition(":")[2], arrays, *model_shape(config))
    n = len(arrays.y)
    _, num_test = split_sizes(n, config.test_fraction)
    num_test = min(n - 1, max(1, num_test))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed + seed_offset))
    x, y = torch.from_numpy(arrays.x), torch.from_numpy(arrays.y)
    test, train = order[:num_test], order[num_test:]
    data = ClientData(TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test]))
    if config.evaluate_on == "validation":
        return validation_split(data.train, config.validation_fraction,
                                seed=config.seed * 100_003 + seed_offset)
    return data


def load_client_data(
    config: FedMoEConfig, partition_id: int, num_partitions: int, phase: str = "train"
) -> ClientData:
    """This client's train/test split of its share for a training ``phase`` (see
    :meth:`FedMoEConfig.phase`), deterministic in ``config.seed``; with ``evaluate-on =
    "validation"`` its train split less a validation split, and the validation split."""
    data = _client_data(config, partition_id, num_partitions, phase)
    if config.evaluate_on == "validation":
        return validation_split(data.train, config.validation_fraction,
                                seed=config.seed * 100_003 + partition_id)
    return data


def validation_size(num_train: int, fraction: float) -> int:
    """How many of a train split's ``num_train`` (≥ 2) examples :func:`validation_split`
    holds out: ``round(fraction · n)``, at least one, and at least one left to train on."""
    return min(num_train - 1, max(1, round(fraction * num_train)))


def validation_split(train: TensorDataset, fraction: float, *, seed: int) -> ClientData:
    """Hold out ``fraction`` of ``train`` (at least one example, and at least one left to
    train on) as a validation set: ``ClientData(train=rest, test=validation)``.

    Raises
    ------
    ValueError
        If ``train`` has fewer than 2 examples.
    """
    n = len(train)
    if n < 2:
        raise ValueError(f"a train split of {n} example(s) cannot spare a validation split")
    held = validation_size(n, fraction)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    rest, held_out = order[held:], order[:held]
    return ClientData(TensorDataset(*(t[rest] for t in train.tensors)),
                      TensorDataset(*(t[held_out] for t in train.tensors)))


@lru_cache(maxsize=4096)
def _client_data(
    config: FedMoEConfig, partition_id: int, num_partitions: int, phase: str
) -> ClientData:
    """Cached per process: a client's handlers load its share on every message (an
    in-process simulation of thousands of messages would otherwise spend most of its time
    here). The tensors are only read, never changed in place."""
    if config.data == "node":
        raise DataFileError("this run reads every SuperNode's own data (dataset = 'node'), "
                            "and this node has none: start it with --node-config "
                            "\"data-path='/path/to/data.csv'\"")
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
    rows = _partition(config, num_partitions)[partition_id]
    part = _source(config.data, config.synthetic_samples, config.label_column,
                   config.feature_bounds).select(rows)
    split = part.train_test_split(test_size=config.test_fraction, seed=config.seed)
    return ClientData(_tensors(split["train"]), _tensors(split["test"]))


def _tensors(ds: Dataset) -> TensorDataset:
    columns = ds.with_format("numpy")[:]  # whole columns at once, not row by row (2-3x)
    x = torch.tensor(np.asarray(columns["x"], dtype=np.float32))
    y = torch.tensor(np.asarray(columns["label"], dtype=np.int64))
    return TensorDataset(x, y)
