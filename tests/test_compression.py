"""Update codecs: each round-trips within its stated bound, error feedback stays bounded,
malformed bytes are refused, and the sizes are what the layout says."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedmoe.compression import CODECS, Codec, CodecError, compress, shapes_of

RNG = np.random.default_rng(0)
#: Shapes like a model's: matrices, vectors, an odd count (4-bit padding), a scalar, an int buffer.
UPDATE = {
    "a.weight": RNG.normal(size=(16, 10)).astype(np.float32),
    "a.bias": RNG.normal(size=(7,)).astype(np.float32) * 1e-3,
    "b.weight": RNG.standard_t(2, size=(3, 5, 11)).astype(np.float32),
    "c.zero": np.zeros((4,), dtype=np.float32),
    "d.scalar": np.array(2.5, dtype=np.float64),
    "e.count": np.array([3, 1, 4], dtype=np.int64),
}
LOSSY = [c for c in CODECS if c != "none"]


def _l2(x: np.ndarray) -> float:
    return float(np.sqrt(np.sum(np.asarray(x, dtype=np.float64) ** 2)))


@pytest.mark.parametrize("name", CODECS)
def test_round_trip_within_the_stated_bound(name):
    codec = Codec(name, topk_fraction=0.1)
    data, out = codec.roundtrip(UPDATE, np.random.default_rng(1))
    assert set(out) == set(UPDATE)
    for key, x in UPDATE.items():
        x64, got = np.asarray(x, dtype=np.float64), out[key]
        assert got.shape == x.shape and got.dtype == x.dtype
        if not np.issubdtype(x.dtype, np.floating) or name == "none":
            np.testing.assert_array_equal(got, x)
            continue
        err = got.astype(np.float64) - x64
        n = x.size
        if name in ("q8", "q4"):
            levels = {"q8": 127, "q4": 7}[name]
            bound = np.abs(x64).max() / levels
            assert np.all(np.abs(err) <= bound * (1 + 1e-6) + 1e-30), key
        elif name == "topk":
            k = max(1, math.ceil(0.1 * n))
            kept = np.sort(np.abs(x64).ravel())[::-1][:k]
            # the kept entries are exact, and the error is exactly the dropped energy
            assert _l2(err) ** 2 == pytest.approx(_l2(x64) ** 2 - np.sum(kept ** 2),
                                                  rel=1e-5, abs=1e-12)
            assert np.count_nonzero(got) <= k
            assert _l2(err) ** 2 <= (1 - k / n) * _l2(x64) ** 2 * (1 + 1e-6) + 1e-12
        else:  # sign with scale ‖x‖₁/n
            expected = _l2(x64) ** 2 - np.abs(x64).sum() ** 2 / n
            assert _l2(err) ** 2 == pytest.approx(expected, rel=1e-4, abs=1e-9)
            assert set(np.unique(np.abs(got))) <= {np.float32(np.abs(x64).mean()).item()}


@pytest.mark.parametrize("name", ["q8", "q4"])
def test_stochastic_rounding_is_unbiased(name):
    x = {"w": np.linspace(-1, 1, 33).astype(np.float32)}
    codec, rng = Codec(name), np.random.default_rng(2)
    mean = np.mean([codec.roundtrip(x, rng)[1]["w"] for _ in range(4000)], axis=0)
    step = 1 / {"q8": 127, "q4": 7}[name]
    # each decoded entry is one of two levels `step` apart: std ≤ step/2, 4000 draws
    assert np.all(np.abs(mean - x["w"]) < 5 * (step / 2) / math.sqrt(4000))


@pytest.mark.parametrize("name", CODECS)
def test_encoded_length_is_the_layout(name):
    codec = Codec(name, topk_fraction=0.05)
    data = codec.encode(UPDATE)
    floats = {k: v for k, v in UPDATE.items() if np.issubdtype(v.dtype, np.floating)}
    nonzero = {k: v for k, v in floats.items() if k != "c.zero"}
    verbatim = UPDATE["e.count"].nbytes
    if name == "none":
        expected = sum(v.nbytes for v in UPDATE.values())
    elif name == "q8":  # the all-zero tensor: its (zero) scale alone
        expected = sum(4 + v.size for v in nonzero.values()) + 4 + verbatim
    elif name == "q4":
        expected = sum(4 + (v.size + 1) // 2 for v in nonzero.values()) + 4 + verbatim
    elif name == "sign":
        expected = sum(4 + (v.size + 7) // 8 for v in nonzero.values()) + 4 + verbatim
    else:  # all tensors here have < 256 entries: uint8 indices, float32 values
        expected = sum(max(1, math.ceil(0.05 * v.size)) * (1 + 4) for v in floats.values()) \
            + verbatim
    assert len(data) == expected == codec.encoded_bytes(shapes_of(UPDATE), {"c.zero"})


@pytest.mark.parametrize("name", ["q8", "q4", "sign"])
def test_an_all_zero_tensor_costs_only_its_scale(name):
    """A part of the model that did not train (all-zero update) is sent as a zero scale;
    the tensors around it decode as before, wherever the zero tensor sits in the order."""
    codec = Codec(name)
    w = np.linspace(-1, 1, 37).astype(np.float32)
    for zero_key in ("a", "m", "z"):
        update = {"m0": w, "m1": -w, zero_key: np.zeros((5, 9), np.float32)}
        dense = {**update, zero_key: np.full((5, 9), 1e-3, np.float32)}
        data, out = codec.roundtrip(update, np.random.default_rng(0))
        assert len(data) == len(codec.encode(dense)) - (codec.tensor_bytes((5, 9), "<f4") - 4)
        np.testing.assert_array_equal(out[zero_key], 0.0)
        assert out[zero_key].shape == (5, 9)
        # the zero tensor draws no randomness: the others decode as if it were not there
        ref = codec.roundtrip({"m0": w, "m1": -w}, np.random.default_rng(0))[1]
        for key in ("m0", "m1"):
            np.testing.assert_array_equal(out[key], ref[key])
        # values too small for a float32 scale decode as zeros in the same short form
        tiny = {**update, zero_key: np.full((5, 9), 1e-300, np.float64)}
        data64, out64 = codec.roundtrip(tiny, np.random.default_rng(0))
        assert len(data64) == len(data)
        np.testing.assert_array_equal(out64[zero_key], 0.0)
        # a zero scale followed by the dense codes it would have had is not this layout
        with pytest.raises(CodecError, match="exactly"):
            codec.decode(data + bytes(codec.tensor_bytes((5, 9), "<f4") - 4),
                         shapes_of(update))


def test_topk_index_width_grows_with_the_tensor():
    codec = Codec("topk", topk_fraction=0.001)
    for n, width in ((256, 1), (257, 2), (65_536, 2), (65_537, 4)):
        k = max(1, math.ceil(0.001 * n))
        assert len(codec.encode({"w": np.ones(n, np.float32)})) == k * (width + 4)


@pytest.mark.parametrize("name", LOSSY)
def test_error_feedback_residual_stays_bounded_over_100_rounds(name):
    """Residual bounds from the codecs' contraction properties, computed here:
    topk/sign: ‖e'‖ ≤ √(1−δ)‖g + e‖ with δ = k/n (topk) or 1/n (sign), so with ‖g‖ ≤ G,
    ‖e‖ ≤ √(1−δ)·G / (1 − √(1−δ)); q_b: |e'_i| < max|g + e|/L, so max|e| ≤ G∞/(L − 1)."""
    rng = np.random.default_rng(3)
    codec = Codec(name, topk_fraction=0.1)
    n = 200
    residual = None
    norms = []
    big_g = 0.0
    big_inf = 0.0
    for _ in range(100):
        g = {"w": (rng.normal(size=n) * rng.uniform(0.1, 1.0)).astype(np.float32)}
        big_g, big_inf = max(big_g, _l2(g["w"])), max(big_inf, float(np.abs(g["w"]).max()))
        _, _, residual = compress(codec, g, residual, rng=rng)
        e = residual["w"].astype(np.float64)
        norms.append(_l2(e))
        if name in ("q8", "q4"):
            levels = {"q8": 127, "q4": 7}[name]
            assert np.abs(e).max() <= big_inf / (levels - 1) * (1 + 1e-5)
        else:
            delta = (max(1, math.ceil(0.1 * n)) if name == "topk" else 1) / n
            r = math.sqrt(1 - delta)
            assert norms[-1] <= r * big_g / (1 - r) * (1 + 1e-5)
    # and it does not drift: the last 50 rounds are no larger than a small multiple of the first
    assert max(norms[50:]) <= 3 * max(norms[:50])


def test_error_feedback_delivers_what_a_codec_dropped():
    """The sum of what the server decoded plus the final residual is the sum of updates."""
    rng = np.random.default_rng(4)
    codec, residual = Codec("topk", topk_fraction=0.05), None
    total, delivered = np.zeros(100), np.zeros(100)
    for _ in range(30):
        g = {"w": rng.normal(size=100).astype(np.float32)}
        _, decoded, residual = compress(codec, g, residual, rng=rng)
        total += g["w"]
        delivered += decoded["w"]
    np.testing.assert_allclose(delivered + residual["w"], total, atol=1e-4)


def test_without_error_feedback_no_residual_and_a_stale_residual_is_dropped():
    g = {"w": np.arange(5, dtype=np.float32)}
    assert compress(Codec("sign"), g, None, error_feedback=False)[2] is None
    assert compress(Codec("none"), g, None)[2] is None
    stale = {"w": np.ones(3, np.float32)}  # another model's shape
    _, decoded, _ = compress(Codec("topk", topk_fraction=1.0), g, stale)
    np.testing.assert_array_equal(decoded["w"], g["w"])


@pytest.mark.parametrize("name", LOSSY)
def test_non_finite_update_is_refused(name):
    with pytest.raises(CodecError, match="non-finite"):
        Codec(name).encode({"w": np.array([1.0, np.nan], np.float32)})


def _scale_bytes(value: float) -> bytes:
    return np.array([value], dtype="<f4").tobytes()


@pytest.mark.parametrize("name,mutate,message", [
    ("q8", lambda b: b[:-1], "exactly"),
    ("sign", lambda b: b + b"\0", "exactly"),
    ("q8", lambda b: _scale_bytes(math.nan) + b[4:], "scale"),
    ("q4", lambda b: _scale_bytes(-1.0) + b[4:], "scale"),
    ("sign", lambda b: _scale_bytes(math.inf) + b[4:], "scale"),
    ("q8", lambda b: b[:4] + bytes([0x80]) + b[5:], r"codes must be in \[-127"),  # int8 −128
    ("q4", lambda b: b[:4] + bytes([0xFF]) + b[5:], r"codes must be in \[-7"),
    ("topk", lambda b: bytes([9, 9]) + b[2:], "strictly increasing"),
    ("topk", lambda b: bytes([0, 200]) + b[2:], "below"),
    ("topk", lambda b: b[:2] + _scale_bytes(math.nan) + b[6:], "NaN"),
])
def test_malformed_bytes_are_refused(name, mutate, message):
    update = {"w": np.linspace(-1, 1, 10).astype(np.float32)}
    codec = Codec(name, topk_fraction=0.2)
    data = codec.encode(update)
    codec.decode(data, shapes_of(update))  # the unmodified bytes decode
    with pytest.raises(CodecError, match=message):
        codec.decode(mutate(data), shapes_of(update))


def test_bad_codec_settings():
    with pytest.raises(CodecError, match="unknown codec"):
        Codec("gzip")
    with pytest.raises(CodecError, match="fraction"):
        Codec("topk", topk_fraction=0.0)
