"""Embedded text corpus: the running interpreter's own standard-library Python source.

The corpus is the ``.py`` source of the standard library that ships with the interpreter
running this code (``sysconfig.get_paths()["stdlib"]``), so nothing is downloaded and every
machine that can run ``fedmoe`` already has it. Note that its exact contents depend on the
Python version (3.11 has ``distutils``, 3.12 does not, ...).

Clients
    One client per top-level stdlib *package* directory (``email``, ``json``, ``http``, ...):
    partition ``p`` of ``n`` reads ``stdlib_packages()[p]``. The split is naturally non-IID:
    each package has its own vocabulary, identifiers, comment style and indentation habits
    (``encodings`` is mostly codec tables, ``pydoc_data`` one huge string literal, ``asyncio``
    deeply nested async code), so byte histograms differ clearly between clients. Test code
    (any path containing ``test``) is left out.

Vocabulary
    Byte level: every token is one byte of the UTF-8 source, ``VOCAB_SIZE = 256``; there is
    no tokenizer to train or ship.

Tasks
    ``lm_windows``: next-token (next-byte) prediction on non-overlapping windows of the
    package source; ``unigram_perplexity`` gives the add-one-smoothed byte unigram baseline a
    language model must beat.

    ``indent_windows`` (downstream classification): given the ``seq_len`` bytes that end at a
    line break, predict the indentation class of the next line, ``min(spaces // 4, 3)`` with
    tabs counted as 4 spaces: ``INDENT_CLASSES = 4`` classes "0, 1, 2, 3+ levels". Solving it
    needs a little syntax (a line ending in ``:`` opens a block, ``return`` closes one).

Building one client's data takes a few milliseconds once its package source is cached.
"""

from __future__ import annotations

import math
import sysconfig
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

#: Byte-level tokens.
VOCAB_SIZE = 256
#: Labels of the downstream task: indentation level 0, 1, 2 or 3 and more.
INDENT_CLASSES = 4

#: Top-level directories never used as clients (tests, GUI/demo code, installers, ...).
_EXCLUDED = frozenset(
    {
        "test",
        "idlelib",
        "site-packages",
        "lib2to3",
        "tkinter",
        "turtledemo",
        "ensurepip",
        "__pycache__",
        "venv",
    }
)
#: A package needs at least this much (non-test) ``.py`` source to be a client.
_MIN_PACKAGE_BYTES = 20_000
_NEWLINE = 10
_SPACES_PER_LEVEL = 4


@dataclass(frozen=True)
class TextData:
    train: TensorDataset
    test: TensorDataset


def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _source_files(package_dir: Path) -> list[Path]:
    """The package's ``.py`` files, sorted by relative path, without test code."""
    files = ((path.relative_to(package_dir).as_posix(), path) for path in package_dir.rglob("*.py"))
    return [path for rel, path in sorted(files) if "test" not in rel and path.is_file()]


def _is_candidate(directory: Path) -> bool:
    name = directory.name
    return (
        directory.is_dir()
        and name not in _EXCLUDED
        and not name.startswith("_")
        and "test" not in name
        and (directory / "__init__.py").is_file()
    )


@lru_cache(maxsize=1)
def _packages() -> tuple[str, ...]:
    names = []
    for directory in sorted(_stdlib_dir().iterdir()):
        if not _is_candidate(directory):
            continue
        size = sum(path.stat().st_size for path in _source_files(directory))
        if size >= _MIN_PACKAGE_BYTES:
            names.append(directory.name)
    return tuple(sorted(names))


def stdlib_packages() -> list[str]:
    """Sorted names of the top-level stdlib packages usable as clients.

    A package is a directory directly under the stdlib directory that has an
    ``__init__.py`` and at least 20,000 bytes of non-test ``.py`` source (recursively).
    Test suites, GUI and demo code (``test``, ``idlelib``, ``lib2to3``, ``tkinter``,
    ``turtledemo``), installers (``ensurepip``, ``venv``), ``site-packages``,
    ``__pycache__`` and every directory whose name starts with ``_`` or contains ``test``
    are excluded.

    Returns
    -------
    list[str]
        Package names in sorted order; the same list on every call.
    """
    return list(_packages())


@lru_cache(maxsize=64)
def package_source(package: str, max_bytes: int = 400_000) -> bytes:
    """Concatenated source of a stdlib package.

    Parameters
    ----------
    package
        A name from ``stdlib_packages()``.
    max_bytes
        Truncate the concatenation to this many bytes.

    Returns
    -------
    bytes
        The package's ``.py`` files (recursive, sorted by path, skipping every path that
        contains ``test``), each followed by ``b"\\n"``, truncated to ``max_bytes``.

    Raises
    ------
    ValueError
        If ``package`` is not one of ``stdlib_packages()`` or ``max_bytes`` < 1.
    """
    if package not in _packages():
        raise ValueError(f"unknown stdlib package '{package}'; available: {list(_packages())}")
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
    chunks, total = [], 0
    for path in _source_files(_stdlib_dir() / package):
        chunk = path.read_bytes() + b"\n"
        chunks.append(chunk)
        total += len(chunk)
        if total >= max_bytes:
            break
    return b"".join(chunks)[:max_bytes]


def _client_package(partition_id: int, num_partitions: int) -> str:
    """The package of client ``partition_id`` out of ``num_partitions``.

    Raises
    ------
    ValueError
        If there are more partitions than packages, or ``partition_id`` is out of range.
    """
    packages = _packages()
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    if num_partitions > len(packages):
        raise ValueError(
            f"{num_partitions} clients requested but this Python's standard library has only "
            f"{len(packages)} usable packages (one per client); use at most {len(packages)} "
            "clients"
        )
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition_id must be in [0, {num_partitions}), got {partition_id}")
    return packages[partition_id]


def _check_sampling(seq_len: int, max_windows: int, test_fraction: float) -> None:
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if max_windows < 2:
        raise ValueError(f"max_windows must be >= 2 (one train, one test), got {max_windows}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")


def _spread(count: int, max_count: int) -> np.ndarray:
    """Indices of at most ``max_count`` of ``count`` items, evenly spread and sorted."""
    if count <= max_count:
        return np.arange(count)
    return np.arange(max_count) * count // max_count


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int, package: str) -> TextData:
    """Shuffle examples with ``seed`` and split them; at least one in train and in test.

    Raises
    ------
    ValueError
        If there are fewer than two examples.
    """
    n = len(x)
    if n < 2:
        raise ValueError(
            f"package '{package}' yields {n} example(s); use a shorter seq_len to get at least 2"
        )
    order = np.random.default_rng(seed).permutation(n)
    n_test = min(max(1, round(n * test_fraction)), n - 1)
    test, train = order[:n_test], order[n_test:]

    def tensors(rows: np.ndarray) -> TensorDataset:
        return TensorDataset(torch.from_numpy(x[rows]), torch.from_numpy(y[rows]))

    return TextData(train=tensors(train), test=tensors(test))


def lm_windows(
    partition_id: int,
    num_partitions: int,
    *,
    seq_len: int,
    max_windows: int,
    test_fraction: float,
    seed: int,
) -> TextData:
    """Next-byte prediction data of one client.

    The client's package source is cut into non-overlapping windows of ``seq_len + 1``
    bytes; ``x`` is a window without its last byte, ``y`` the window without its first
    (``y[:, t]`` is the byte after ``x[:, t]``). If there are more than ``max_windows``
    windows, ``max_windows`` of them are taken evenly spread over the source.

    Parameters
    ----------
    partition_id, num_partitions
        This client, out of ``num_partitions``; client ``p`` reads ``stdlib_packages()[p]``.
    seq_len
        Tokens per example.
    max_windows
        At most this many examples (train and test together).
    test_fraction
        Share of the examples held out as test set (at least one example each side).
    seed
        Seed of the shuffle before the split.

    Returns
    -------
    TextData
        ``train`` and ``test`` ``TensorDataset``s of ``(x, y)``, both int64 ``(N, seq_len)``.

    Raises
    ------
    ValueError
        On too many partitions or a bad ``partition_id`` (see ``stdlib_packages``), on
        ``seq_len < 1``, ``max_windows < 2`` or ``test_fraction`` outside (0, 1), and if the
        package has fewer than two windows.
    """
    _check_sampling(seq_len, max_windows, test_fraction)
    package = _client_package(partition_id, num_partitions)
    data = np.frombuffer(package_source(package), dtype=np.uint8)
    count = len(data) // (seq_len + 1)
    windows = data[: count * (seq_len + 1)].reshape(count, seq_len + 1)
    windows = windows[_spread(count, max_windows)].astype(np.int64)
    return _split(windows[:, :-1], windows[:, 1:].copy(), test_fraction, seed, package)


def _indent_class(line: bytes) -> int:
    """``min(leading_width // 4, 3)`` with a tab counting as 4 spaces."""
    body = line.lstrip(b" \t")
    prefix = line[: len(line) - len(body)]
    width = prefix.count(b" ") + _SPACES_PER_LEVEL * prefix.count(b"\t")
    return min(width // _SPACES_PER_LEVEL, INDENT_CLASSES - 1)


@lru_cache(maxsize=64)
def _line_breaks(package: str) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the line breaks followed by a non-blank line, and that line's class.

    A line is blank when it holds only whitespace. Only complete lines (ended by a break)
    are labels: the text after the final break is empty or cut off by ``max_bytes``.
    """
    source = package_source(package)
    lines = source.split(b"\n")
    breaks = np.cumsum([len(line) + 1 for line in lines[:-1]]) - 1  # break ending line k
    positions, labels = [], []
    for k, line in enumerate(lines[1:-1]):
        if line.strip():
            positions.append(breaks[k])
            labels.append(_indent_class(line))
    return np.asarray(positions, dtype=np.int64), np.asarray(labels, dtype=np.int64)


def indent_windows(
    partition_id: int,
    num_partitions: int,
    *,
    seq_len: int,
    max_windows: int,
    test_fraction: float,
    seed: int,
) -> TextData:
    """Downstream task of one client: the indentation class of the next line.

    Each example is a line break of the package source that is followed by a non-blank
    line. ``x`` is the ``seq_len`` bytes of the (concatenated) package source ending with
    that ``b"\\n"``, left-padded with byte 0 where the source before it is shorter; ``y``
    is the next line's indentation class ``min(leading_spaces // 4, 3)``, tabs counting
    as 4 spaces. Sampling and splitting follow ``lm_windows``.

    Parameters
    ----------
    partition_id, num_partitions
        This client, out of ``num_partitions``; client ``p`` reads ``stdlib_packages()[p]``.
    seq_len
        Context bytes per example.
    max_windows
        At most this many examples (evenly spread over the source if there are more).
    test_fraction
        Share of the examples held out as test set (at least one example each side).
    seed
        Seed of the shuffle before the split.

    Returns
    -------
    TextData
        ``train`` and ``test`` of ``(x, y)``: ``x`` int64 ``(N, seq_len)``, ``y`` int64
        ``(N,)`` in ``[0, INDENT_CLASSES)``.

    Raises
    ------
    ValueError
        As for ``lm_windows``.
    """
    _check_sampling(seq_len, max_windows, test_fraction)
    package = _client_package(partition_id, num_partitions)
    positions, labels = _line_breaks(package)
    keep = _spread(len(positions), max_windows)
    positions, labels = positions[keep], labels[keep]
    source = np.frombuffer(package_source(package), dtype=np.uint8)
    padded = np.concatenate([np.zeros(seq_len, dtype=np.uint8), source])
    # Source byte i sits at padded[i + seq_len]: the window ending at i is padded[i+1 : i+1+L].
    index = positions[:, None] + 1 + np.arange(seq_len)
    x = padded[index].astype(np.int64)
    return _split(x, labels.copy(), test_fraction, seed, package)


def unigram_perplexity(train: torch.Tensor, test: torch.Tensor) -> float:
    """Perplexity on ``test`` of the add-one-smoothed byte unigram model fitted on ``train``.

    ``p(b) = (count_train(b) + 1) / (len(train) + 256)``; the perplexity is
    ``exp(-mean(log p(test)))``. The baseline a byte-level language model must beat
    (256 for a model that knows nothing).

    Parameters
    ----------
    train, test
        Integer tensors of any shape with values in ``[0, 256)``.

    Returns
    -------
    float
        The perplexity (at least 1; 256 for the uniform model of an empty ``train``).

    Raises
    ------
    ValueError
        If ``test`` is empty or a value lies outside ``[0, 256)``.
    """
    train_flat = train.detach().reshape(-1).to("cpu", torch.int64)
    test_flat = test.detach().reshape(-1).to("cpu", torch.int64)
    if test_flat.numel() == 0:
        raise ValueError("test is empty; perplexity needs at least one token")
    for name, tokens in (("train", train_flat), ("test", test_flat)):
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= VOCAB_SIZE):
            raise ValueError(f"{name} holds values outside [0, {VOCAB_SIZE})")
    counts = torch.bincount(train_flat, minlength=VOCAB_SIZE).double() + 1.0
    log_probs = counts.log() - math.log(counts.sum().item())
    return math.exp(-log_probs[test_flat].mean().item())
