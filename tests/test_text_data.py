import math

import pytest
import torch

from fedmoe.data.text import (
    INDENT_CLASSES,
    VOCAB_SIZE,
    indent_windows,
    lm_windows,
    package_source,
    stdlib_packages,
    unigram_perplexity,
)

SAMPLING = {"seq_len": 64, "max_windows": 400, "test_fraction": 0.2, "seed": 0}


def _all(data):
    """(x, y) of train and test together."""
    return tuple(torch.cat([a, b]) for a, b in zip(data.train.tensors, data.test.tensors, strict=True))


def _client(package: str) -> int:
    return stdlib_packages().index(package)


def test_stdlib_packages_are_sorted_non_test_clients():
    packages = stdlib_packages()
    assert len(packages) >= 8
    assert packages == sorted(packages)
    assert not any("test" in name or name.startswith("_") for name in packages)
    assert {"email", "json", "http"} <= set(packages)
    assert not {"idlelib", "tkinter", "lib2to3", "venv", "ensurepip"} & set(packages)
    for name in packages:
        assert len(package_source(name)) >= 20_000


def test_package_source_is_the_sorted_files_truncated():
    source = package_source("json")
    assert source.startswith(b'r"""JSON (JavaScript Object Notation)')  # json/__init__.py
    assert b"def dumps(" in source and b"class JSONDecoder" in source
    assert package_source("json", max_bytes=1000) == source[:1000]
    assert len(package_source("asyncio", max_bytes=5000)) == 5000
    with pytest.raises(ValueError, match="unknown stdlib package 'test'"):
        package_source("test")


def test_lm_windows_shapes_shift_and_determinism():
    n = len(stdlib_packages())
    data = lm_windows(_client("json"), n, **SAMPLING)
    for x, y in (data.train.tensors, data.test.tensors):
        assert x.dtype == y.dtype == torch.int64
        assert x.shape == y.shape and x.shape[1] == 64
        assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one byte
        assert 0 <= x.min() and x.max() < VOCAB_SIZE
    assert len(data.train) == 320 and len(data.test) == 80  # capped at max_windows, 20% test

    again = lm_windows(_client("json"), n, **SAMPLING)
    assert all(map(torch.equal, _all(data), _all(again)))
    other_seed = lm_windows(_client("json"), n, **{**SAMPLING, "seed": 1})
    assert not torch.equal(data.train.tensors[0], other_seed.train.tensors[0])
    # a different seed reshuffles the same windows
    rows = sorted(map(tuple, _all(data)[0].tolist()))
    assert rows == sorted(map(tuple, _all(other_seed)[0].tolist()))


def test_lm_windows_are_pieces_of_the_package_source():
    n = len(stdlib_packages())
    source = package_source("http")
    data = lm_windows(_client("http"), n, seq_len=32, max_windows=50, test_fraction=0.1, seed=3)
    x, y = _all(data)
    aligned = {source[i : i + 33] for i in range(0, len(source) - 32, 33)}  # non-overlapping
    windows = [bytes(xr + yr[-1:]) for xr, yr in zip(x.tolist(), y.tolist(), strict=True)]
    assert len(windows) == 50 and set(windows) <= aligned
    # evenly spread: the windows come from all over the source, not just its start
    offsets = sorted(source.find(w) for w in windows)
    assert offsets[0] < len(source) // 10 and offsets[-1] > len(source) * 9 // 10


def test_clients_have_different_byte_distributions():
    n = len(stdlib_packages())

    def histogram(package: str) -> torch.Tensor:
        x, _ = _all(lm_windows(_client(package), n, **SAMPLING))
        counts = torch.bincount(x.reshape(-1), minlength=VOCAB_SIZE).double()
        return counts / counts.sum()

    a, b, c = histogram("json"), histogram("encodings"), histogram("pydoc_data")
    assert 0.5 * (a - b).abs().sum() > 0.05
    assert 0.5 * (a - c).abs().sum() > 0.05
    assert 0.5 * (b - c).abs().sum() > 0.05


def _indentation_class_after(source: bytes, newline: int) -> int:
    """Independent label: walk the next line's leading whitespace."""
    width, position = 0, newline + 1
    while position < len(source):
        byte = source[position]
        position += 1
        if byte == ord(" "):
            width += 1
        elif byte == ord("\t"):
            width += 4
        else:
            break
    return min(width // 4, 3)


def _labels_by_context(source: bytes, seq_len: int) -> dict[bytes, set[int]]:
    """Independent labelling: every line break followed by a non-blank line, keyed by the
    zero-padded seq_len bytes ending with it (a context may occur more than once)."""
    padded = bytes(seq_len) + source
    labels: dict[bytes, set[int]] = {}
    for newline in (i for i, byte in enumerate(source) if byte == ord("\n")):
        end = source.find(b"\n", newline + 1)
        if end < 0 or not source[newline + 1 : end].strip():
            continue  # blank, or cut off at the end of the source
        context = padded[newline + 1 : newline + 1 + seq_len]
        labels.setdefault(context, set()).add(_indentation_class_after(source, newline))
    return labels


def test_indent_windows_end_at_line_breaks_with_correct_labels():
    n = len(stdlib_packages())
    source = package_source("email")
    data = indent_windows(_client("email"), n, **SAMPLING)
    x, y = _all(data)
    assert x.dtype == y.dtype == torch.int64
    assert x.shape == (400, 64) and y.shape == (400,)
    assert len(data.test) == 80
    assert bool((x[:, -1] == ord("\n")).all())
    assert 0 <= y.min() and y.max() < INDENT_CLASSES
    assert len(y.unique()) >= 2

    labels_of = _labels_by_context(source, 64)
    for row, label in zip(x.tolist(), y.tolist(), strict=True):
        assert label in labels_of[bytes(row)]


def test_indent_windows_pad_the_start_of_the_source():
    n = len(stdlib_packages())
    source = package_source("json")
    first_break = source.index(b"\n")
    data = indent_windows(
        _client("json"), n, seq_len=256, max_windows=10**6, test_fraction=0.5, seed=0
    )
    x, y = _all(data)
    expected = bytes(256 - first_break - 1) + source[: first_break + 1]
    rows = [i for i, r in enumerate(x.tolist()) if bytes(r) == expected]
    assert len(rows) == 1  # the first line of json/__init__.py is followed by a non-empty line
    assert y[rows[0]] == 0  # "JavaScript syntax (ECMA-262 ..." starts unindented
    assert bool((x[:, -1] == ord("\n")).all())
    # every break followed by a non-blank line is an example when nothing caps them
    lines = source.split(b"\n")
    assert len(x) == sum(1 for line in lines[1:-1] if line.strip())


def test_indent_labels_cover_classes_across_clients():
    n = len(stdlib_packages())
    labels = torch.cat([_all(indent_windows(p, n, **SAMPLING))[1] for p in range(n)])
    assert set(labels.unique().tolist()) == set(range(INDENT_CLASSES))


def test_unigram_perplexity_of_uniform_and_constant_data():
    uniform = torch.arange(256).repeat(40)
    assert unigram_perplexity(uniform, uniform) == pytest.approx(256.0)
    constant = torch.full((10_000,), 65, dtype=torch.int64)
    ppl = unigram_perplexity(constant, constant)
    assert 1.0 < ppl < 1.05  # add-one smoothing leaves a little mass to the 255 unseen bytes


def test_unigram_perplexity_matches_independent_computation():
    generator = torch.Generator().manual_seed(0)
    train = torch.randint(0, 20, (7, 33), generator=generator)
    test = torch.randint(0, 30, (5, 11), generator=generator)
    counts = [0] * 256
    for token in train.reshape(-1).tolist():
        counts[token] += 1
    total = train.numel() + 256
    mean_nll = (
        -sum(math.log((counts[t] + 1) / total) for t in test.reshape(-1).tolist()) / test.numel()
    )
    assert unigram_perplexity(train, test) == pytest.approx(math.exp(mean_nll), rel=1e-9)


def test_unigram_baseline_on_real_code_is_far_below_uniform():
    n = len(stdlib_packages())
    data = lm_windows(_client("logging"), n, **SAMPLING)
    ppl = unigram_perplexity(data.train.tensors[0], data.test.tensors[1])
    assert 10 < ppl < 40


def test_unigram_perplexity_rejects_bad_input():
    with pytest.raises(ValueError, match="outside"):
        unigram_perplexity(torch.tensor([0, 256]), torch.tensor([1]))
    with pytest.raises(ValueError, match="empty"):
        unigram_perplexity(torch.tensor([1]), torch.tensor([], dtype=torch.int64))


def test_too_many_clients_and_bad_partition_ids_are_rejected():
    n = len(stdlib_packages())
    for make in (lm_windows, indent_windows):
        with pytest.raises(ValueError, match=rf"only {n} usable packages.*use at most {n} clients"):
            make(0, n + 1, **SAMPLING)
        with pytest.raises(ValueError, match=r"partition_id must be in \[0, 3\), got 3"):
            make(3, 3, **SAMPLING)
        with pytest.raises(ValueError, match=r"partition_id must be in \[0, 3\), got -1"):
            make(-1, 3, **SAMPLING)
        with pytest.raises(ValueError, match="test_fraction"):
            make(0, 3, **{**SAMPLING, "test_fraction": 1.0})


def test_small_budgets_keep_one_train_and_one_test_example():
    data = lm_windows(0, 2, seq_len=8, max_windows=2, test_fraction=0.01, seed=0)
    assert len(data.train) == len(data.test) == 1
    data = indent_windows(1, 2, seq_len=8, max_windows=3, test_fraction=0.99, seed=0)
    assert len(data.train) == 1 and len(data.test) == 2


def test_tabs_count_as_four_spaces():
    from fedmoe.data.text import _indent_class  # the stdlib packages hold no tab-indented code

    assert [_indent_class(b) for b in (b"x", b"   x", b"    x", b"\tx", b" \t  x")] == [
        0,
        0,
        1,
        1,
        1,
    ]
    assert [_indent_class(b) for b in (b"\t\tx", b"\t    \tx", b"\t\t\t\t\tx")] == [2, 3, 3]


def test_one_client_builds_in_well_under_a_second():
    import time

    from fedmoe.data import text

    n = len(stdlib_packages())
    text.package_source.cache_clear()
    text._line_breaks.cache_clear()
    start = time.perf_counter()
    lm_windows(_client("asyncio"), n, **SAMPLING)  # the largest package: reads 400 kB
    indent_windows(_client("asyncio"), n, **SAMPLING)
    assert time.perf_counter() - start < 1.0
