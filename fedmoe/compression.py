"""Update codecs: fewer bytes on the wire, for any set of named arrays.

One module used by both sides. A codec turns an *update* — a mapping of names to numpy
arrays (the difference between a client's trained ``shared``+``gate`` tensors and the
global ones it started from, or between a new global model and what a client already
holds) — into one byte string, and back. Both sides know the names, shapes and dtypes (the
global model's), so the bytes carry no metadata: tensors are laid out in sorted-name order
and the decoder checks that the length is exactly what the codec and the shapes imply.

Codecs (``upload-codec``, ``download-codec``) and their error bounds, per tensor ``x`` with
``n`` elements, decoded ``x̂``:

=========  ===============================================  ===========================================
name       payload per tensor                               bound
=========  ===============================================  ===========================================
``none``   (not encoded: the plain arrays are sent)         exact
``q8``     float32 scale s = max|x|, n int8 in [-127, 127]  |x̂_i − x_i| < s/127, E[x̂] = x
``q4``     float32 scale s = max|x|, n 4-bit codes in       |x̂_i − x_i| < s/7, E[x̂] = x
           [-7, 7] (two per byte)
``topk``   k = ⌈f·n⌉ indices (uint8/16/32: the smallest     kept entries exact;
           that holds n−1) and k float32 values: the k      ‖x − x̂‖² = ‖x‖² − ‖x_topk‖² ≤ (1 − k/n)‖x‖²
           entries of largest magnitude
``sign``   float32 scale s = ‖x‖₁/n, n sign bits            ‖x − x̂‖² = ‖x‖² − ‖x‖₁²/n ≤ (1 − 1/n)‖x‖²
=========  ===============================================  ===========================================

A tensor whose entries are all zero (a part of the model that did not train this round,
e.g. the routed experts of a client whose expert switch is off) costs only its scale in the
scaled codecs (``q8``, ``q4``, ``sign``): a zero scale means "all zeros" and no codes follow.
Whether a tensor is all zero is a function of the update itself, which the plain (``none``)
encoding shows as well, so this reveals nothing more. The length of an encoding is therefore
fixed by the shapes *and* by which tensors are zero (:meth:`Codec.encoded_bytes`).

``q8``/``q4`` round stochastically (``⌊x/s·L + u⌋``, u ~ U[0, 1)), so they are unbiased;
``topk`` and ``sign`` are biased contractions, which :func:`compress` corrects with error
feedback: the part of an update the codec dropped is kept (the *residual*) and added to the
next update, so nothing is lost for good (Seide et al. 2014; Karimireddy et al. 2019).
Tensors of a non-float dtype (integer buffers) are carried verbatim by every codec.

Privacy: every codec is applied to tensors that are already differentially private (the
model after the round's last noisy DP-SGD step, minus public global tensors), and the
residual is a function of such tensors only, so encoding is post-processing and costs no
privacy (``docs/architecture.md``). Nothing here ever touches data or per-sample gradients.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedmoe.config import CODECS, FedMoEConfig  # the names ``upload-codec`` / ``download-codec`` take
#: Quantisation levels on each side of zero, per bit width.
_LEVELS = {"q8": 127, "q4": 7}
#: Codecs whose tensors start with a scale (a zero scale: an all-zero tensor, no codes).
_SCALED = ("q8", "q4", "sign")
_SCALE = np.dtype("<f4")
_VALUE = np.dtype("<f4")

Shapes = Mapping[str, tuple[tuple[int, ...], str]]


class CodecError(ValueError):
    """An update cannot be encoded (non-finite values), or encoded bytes are malformed
    (wrong length, out-of-range codes or indices, a non-finite or negative scale)."""


@dataclass(frozen=True)
class Codec:
    """An update codec.

    Parameters
    ----------
    name : str
        One of :data:`CODECS`.
    topk_fraction : float (default: 0.01)
        ``topk``: share f of each tensor's entries kept, k = ⌈f·n⌉ (at least one), in (0, 1].

    Raises
    ------
    CodecError
        For an unknown name or a fraction outside (0, 1].
    """

    name: str = "none"
    topk_fraction: float = 0.01

    def __post_init__(self) -> None:
        if self.name not in CODECS:
            raise CodecError(f"unknown codec {self.name!r}; use one of {CODECS}")
        if not 0.0 < self.topk_fraction <= 1.0:
            raise CodecError(f"topk fraction must be in (0, 1], got {self.topk_fraction}")

    @classmethod
    def upload(cls, config: FedMoEConfig) -> Codec:
        """The run's client → server codec."""
        return cls(config.upload_codec, config.codec_topk_fraction)

    @classmethod
    def download(cls, config: FedMoEConfig) -> Codec:
        """The run's server → client codec."""
        return cls(config.download_codec, config.codec_topk_fraction)

    @property
    def lossless(self) -> bool:
        return self.name == "none"

    # ------------------------------------------------------------------ sizes
    def tensor_bytes(self, shape: tuple[int, ...], dtype: str, zero: bool = False) -> int:
        """Bytes one tensor of ``shape`` and ``dtype`` takes in this codec's encoding;
        ``zero``: the tensor is all zeros (only its scale is sent by a scaled codec)."""
        n = math.prod(shape)
        if not np.issubdtype(np.dtype(dtype), np.floating) or self.name == "none":
            return n * np.dtype(dtype).itemsize
        if self.name in _SCALED and zero:
            return _SCALE.itemsize
        if self.name == "q8":
            return _SCALE.itemsize + n
        if self.name == "q4":
            return _SCALE.itemsize + (n + 1) // 2
        if self.name == "sign":
            return _SCALE.itemsize + (n + 7) // 8
        k = self.topk_k(n)
        return k * (_index_dtype(n).itemsize + _VALUE.itemsize)

    def encoded_bytes(self, shapes: Shapes, zero: frozenset[str] | set[str] = frozenset()) -> int:
        """Exact length of an encoded update of tensors ``shapes`` (name → (shape, dtype))
        whose tensors named in ``zero`` are all zeros (with none: the largest length)."""
        return sum(self.tensor_bytes(tuple(s), d, key in zero) for key, (s, d) in shapes.items())

    def topk_k(self, n: int) -> int:
        """Entries ``topk`` keeps of a tensor of ``n`` (0 for an empty tensor)."""
        return min(n, max(1, math.ceil(self.topk_fraction * n))) if n else 0

    # --------------------------------------------------------------- encoding
    def encode(self, update: Mapping[str, np.ndarray],
               rng: np.random.Generator | None = None) -> bytes:
        """Encode ``update`` (tensors in sorted-name order).

        Parameters
        ----------
        update : mapping of str to ndarray
            Any shapes; float tensors are compressed, others carried verbatim.
        rng : numpy Generator, optional
            Randomness of stochastic rounding (default: fresh OS entropy).

        Raises
        ------
        CodecError
            If a float tensor holds NaN or ±inf (or a magnitude float32 cannot hold).
        """
        rng = rng if rng is not None else np.random.default_rng()
        return b"".join(self._encode_tensor(key, np.asarray(update[key]), rng)
                        for key in sorted(update))

    def _encode_tensor(self, key: str, x: np.ndarray, rng: np.random.Generator) -> bytes:
        if not np.issubdtype(x.dtype, np.floating) or self.name == "none":
            return np.ascontiguousarray(x).astype(x.dtype.newbyteorder("<")).tobytes()
        flat = x.astype(np.float64).ravel()
        if not np.all(np.isfinite(flat)) or (flat.size and
                                             np.abs(flat).max() > np.finfo(np.float32).max):
            raise CodecError(f"update '{key}' holds non-finite values (or values beyond "
                             "float32); nothing can be encoded")
        if self.name in _SCALED:
            magnitude = (np.abs(flat).mean() if self.name == "sign" else np.abs(flat).max()) \
                if flat.size else 0.0
            scale = np.float32(magnitude)
            if scale == 0:  # all zeros (or below float32's range): the scale alone
                return np.zeros(1, dtype=_SCALE).tobytes()
        if self.name in _LEVELS:
            levels = _LEVELS[self.name]
            y = flat / float(scale) * levels
            codes = np.clip(np.floor(y + rng.random(flat.size)), -levels, levels).astype(np.int64)
            if self.name == "q8":
                payload = codes.astype(np.int8).tobytes()
            else:
                nibbles = (codes + levels).astype(np.uint8)
                if nibbles.size % 2:
                    nibbles = np.append(nibbles, np.uint8(levels))  # a zero code as padding
                payload = (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8).tobytes()
            return np.array([scale], dtype=_SCALE).tobytes() + payload
        if self.name == "sign":
            bits = np.packbits(flat < 0)  # 1 = negative; 0 = positive or zero
            return np.array([scale], dtype=_SCALE).tobytes() + bits.tobytes()
        k = self.topk_k(flat.size)
        index = np.sort(np.argpartition(-np.abs(flat), k - 1)[:k]) if k else np.zeros(0, int)
        return (index.astype(_index_dtype(flat.size)).tobytes()
                + flat[index].astype(_VALUE).tobytes())

    # --------------------------------------------------------------- decoding
    def decode(self, data: bytes, shapes: Shapes) -> dict[str, np.ndarray]:
        """Decode bytes made by :meth:`encode` for tensors ``shapes`` (name → (shape, dtype)).

        Raises
        ------
        CodecError
            Naming the first fault: a length other than :meth:`encoded_bytes`, a scale
            that is negative or not finite, a code outside the codec's range, top-k
            indices not strictly increasing or out of range, a non-finite value.
        """
        out, offset = {}, 0
        for key in sorted(shapes):
            shape, dtype = tuple(shapes[key][0]), np.dtype(shapes[key][1])
            zero = False
            if self.name in _SCALED and np.issubdtype(dtype, np.floating):
                head = data[offset:offset + _SCALE.itemsize]
                zero = len(head) == _SCALE.itemsize and not np.frombuffer(head, _SCALE)[0]
            size = self.tensor_bytes(shape, dtype.str, zero)
            if offset + size > len(data):
                break  # too short: reported below with the length the layout needs
            out[key] = self._decode_tensor(key, data[offset:offset + size], shape, dtype)
            offset += size
        if offset != len(data) or len(out) != len(shapes):
            zeros = {k for k in shapes if k in out and not np.any(out[k])}
            expected = self.encoded_bytes(shapes, zeros)
            raise CodecError(f"encoded update ({self.name}) has {len(data):,} bytes, the "
                             f"global model's shapes need exactly {expected:,}")
        return out

    def _decode_tensor(self, key: str, chunk: bytes, shape: tuple[int, ...],
                       dtype: np.dtype) -> np.ndarray:
        n = math.prod(shape)
        if not np.issubdtype(dtype, np.floating) or self.name == "none":
            value = np.frombuffer(chunk, dtype=dtype.newbyteorder("<")).astype(dtype)
            if np.issubdtype(dtype, np.floating) and not np.all(np.isfinite(value)):
                raise CodecError(f"'{key}' contains NaN or inf")
            return value.reshape(shape)
        if self.name == "topk":
            k, index_dtype = self.topk_k(n), _index_dtype(n)
            index = np.frombuffer(chunk[:k * index_dtype.itemsize], dtype=index_dtype)
            values = np.frombuffer(chunk[k * index_dtype.itemsize:], dtype=_VALUE)
            if k and (int(index[-1]) >= n or np.any(np.diff(index.astype(np.int64)) <= 0)):
                raise CodecError(f"'{key}': top-k indices must be strictly increasing and "
                                 f"below {n}")
            if not np.all(np.isfinite(values)):
                raise CodecError(f"'{key}': top-k values contain NaN or inf")
            flat = np.zeros(n, dtype=np.float64)
            flat[index.astype(np.int64)] = values
            return flat.astype(dtype).reshape(shape)
        scale = float(np.frombuffer(chunk[:_SCALE.itemsize], dtype=_SCALE)[0])
        if not (math.isfinite(scale) and scale >= 0):
            raise CodecError(f"'{key}': scale must be finite and >= 0, got {scale}")
        if scale == 0:  # an all-zero tensor: the scale alone (see the module docstring)
            return np.zeros(shape, dtype=dtype)
        body = np.frombuffer(chunk[_SCALE.itemsize:], dtype=np.uint8)
        if self.name == "sign":
            negative = np.unpackbits(body)[:n].astype(bool)
            flat = np.where(negative, -scale, scale)
        else:
            levels = _LEVELS[self.name]
            if self.name == "q8":
                codes = body.view(np.int8).astype(np.int64)
            else:
                codes = np.empty(2 * body.size, dtype=np.int64)
                codes[0::2], codes[1::2] = body & 0x0F, body >> 4
                codes = codes[:n] - levels
            if np.any(np.abs(codes) > levels):
                raise CodecError(f"'{key}': {self.name} codes must be in [-{levels}, {levels}]")
            flat = codes * (scale / levels)
        return flat.astype(dtype).reshape(shape)

    def roundtrip(self, update: Mapping[str, np.ndarray],
                  rng: np.random.Generator | None = None) -> tuple[bytes, dict[str, np.ndarray]]:
        """``(encode(update), decode(encode(update)))``: the bytes and what the receiver gets."""
        data = self.encode(update, rng)
        return data, self.decode(data, shapes_of(update))


def _index_dtype(n: int) -> np.dtype:
    """The smallest unsigned little-endian integer that holds every index below ``n``."""
    for dtype in ("<u1", "<u2", "<u4"):
        if n - 1 <= np.iinfo(np.dtype(dtype)).max:
            return np.dtype(dtype)
    return np.dtype("<u8")


def shapes_of(arrays: Mapping[str, np.ndarray]) -> dict[str, tuple[tuple[int, ...], str]]:
    """name → (shape, dtype string) of ``arrays``: what :meth:`Codec.decode` takes."""
    return {k: (tuple(np.shape(v)), np.asarray(v).dtype.str) for k, v in arrays.items()}


def compress(
    codec: Codec,
    update: Mapping[str, np.ndarray],
    residual: Mapping[str, np.ndarray] | None,
    *,
    error_feedback: bool = True,
    rng: np.random.Generator | None = None,
) -> tuple[bytes, dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """Encode ``update`` with error feedback.

    With ``error_feedback``, the residual of earlier rounds is added to the update first,
    and what the codec dropped this time becomes the new residual:
    ``u = update + residual``, ``bytes = encode(u)``, ``residual' = u − decode(bytes)``
    (float tensors; 0 for the others). A residual whose names or shapes differ from the
    update's (the model changed) is discarded.

    Parameters
    ----------
    codec : Codec
    update : mapping of str to ndarray
        The DP-protected update (already noised: see the module docstring).
    residual : mapping of str to ndarray, or None
        The client's residual from its last round (None: none yet).
    error_feedback : bool (default: True)
        False: encode ``update`` alone and return no residual.
    rng : numpy Generator, optional

    Returns
    -------
    (bytes, decoded, residual)
        The encoded update, what the server will decode from it, and the new residual
        (None without error feedback or for a lossless codec).
    """
    use = error_feedback and not codec.lossless
    if use and residual is not None and shapes_of(residual) == shapes_of(update):
        update = {k: np.asarray(v) + residual[k] if _floating(v) else v
                  for k, v in update.items()}
    data, decoded = codec.roundtrip(update, rng)
    if not use:
        return data, decoded, None
    new_residual = {k: (np.asarray(v) - decoded[k]).astype(np.asarray(v).dtype) if _floating(v)
                    else np.zeros_like(v) for k, v in update.items()}
    return data, decoded, new_residual


def _floating(value: np.ndarray) -> bool:
    return np.issubdtype(np.asarray(value).dtype, np.floating)
