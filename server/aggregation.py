"""Checking one client's update and combining the valid ones: FedAvg, median, trimmed mean.

Everything here reads only DP-protected train replies (the ``shared`` and ``gate`` arrays a
client released after DP-SGD) and the server's own global arrays, so every rule is
post-processing of DP outputs and costs no privacy. The robust rules are Flower's
(``np.median`` as in its ``FedMedian``; :func:`flwr.serverapp.strategy.fedtrimmedavg.trim_mean`
of its ``FedTrimmedAvg``), applied per array after fedmoe's own validation: Flower's
strategies would run them on unvalidated replies (and ``FedMedian`` pops the arrays out of
the messages it reads).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean

from fedmoe.records import ReplyError

#: One reply's arrays, or the global model's: array key -> array.
Arrays = Mapping[str, np.ndarray]


def check_update(reply: Arrays, global_arrays: Arrays, max_norm: float) -> float:
    """The L2 norm of ``reply − global`` over all arrays, if the update is one to use.

    ``reply`` has already been checked to carry exactly the global keys, shapes and dtypes
    and finite values. Refused here: an update longer than ``max_norm`` (a scaled or
    corrupted reply; the norm is computed in float64, so float32 values near their
    maximum give an infinite norm, refused too), an update that is exactly zero (a client
    that sent the global model back untouched did not run a round: DP noise alone would
    have moved it) and a model zeroed out where the global one is not. A model without
    arrays (method ``local``) has nothing to check: norm 0.

    Raises
    ------
    ReplyError
        Naming the fault and the figure.
    """
    if not global_arrays:
        return 0.0
    square, reply_zero, global_zero = 0.0, True, True
    for key, target in global_arrays.items():
        value = np.asarray(reply[key], dtype=np.float64)
        base = np.asarray(target, dtype=np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            square += float(np.sum(np.square(value - base)))
        reply_zero = reply_zero and not np.any(value)
        global_zero = global_zero and not np.any(base)
    norm = float(np.sqrt(square))
    if not norm <= max_norm:  # NaN (inf - inf) and inf land here too
        raise ReplyError(f"update norm {norm:.4g} exceeds max-update-norm={max_norm:g}")
    if reply_zero and not global_zero:
        raise ReplyError("all arrays are zero (the global model is not): a zeroed model, "
                         "not an update")
    if norm == 0.0:
        raise ReplyError("the update is exactly zero: the global model came back untouched "
                         "(no training round was run)")
    return norm


def aggregate(
    replies: Sequence[Arrays],
    weights: Sequence[float],
    method: str,
    *,
    trim_fraction: float = 0.2,
) -> dict[str, np.ndarray]:
    """Combine validated replies into new global arrays, with the dtypes of the replies.

    Parameters
    ----------
    replies : sequence of mappings, at least one
        Each reply's arrays; all with the same keys, shapes and dtypes.
    weights : sequence of float
        ``fedavg`` weights (``num-examples``, each ≥ 1); ignored by the robust rules.
    method : {"fedavg", "median", "trimmed-mean"}
        ``fedavg``: weighted mean. ``median``: coordinate-wise median. ``trimmed-mean``:
        coordinate-wise mean after cutting ``int(trim_fraction · n)`` replies from each
        end (Flower's rule: with fewer than ``1 / trim_fraction`` replies nothing is cut).
    trim_fraction : float in [0, 0.5) (default: 0.2)

    Returns
    -------
    dict
        Key -> aggregated array (float64 accumulation, cast back to the replies' dtype).

    Raises
    ------
    ValueError
        For no replies, a weight count that differs, or an unknown method.
    """
    if not replies or len(weights) != len(replies):
        raise ValueError(f"need >= 1 reply and one weight each, got {len(replies)} replies "
                         f"and {len(weights)} weights")
    out: dict[str, np.ndarray] = {}
    for key, first in replies[0].items():
        stack = np.stack([np.asarray(r[key], dtype=np.float64) for r in replies])  # (n, *shape)
        if method == "fedavg":
            w = np.asarray(weights, dtype=np.float64)
            value = np.tensordot(w / w.sum(), stack, axes=1)
        elif method == "median":
            value = np.median(stack, axis=0)
        elif method == "trimmed-mean":
            value = trim_mean(stack, trim_fraction)
        else:
            raise ValueError(f"unknown aggregation {method!r}")
        out[key] = np.asarray(value).astype(np.asarray(first).dtype)
    return out


def server_step(
    global_arrays: Arrays,
    combined: Arrays,
    velocity: dict[str, np.ndarray],
    momentum: float,
    learning_rate: float,
) -> dict[str, np.ndarray]:
    """The new global arrays after the server optimiser's step on the aggregate (FedAvgM).

    With Δ = ``combined`` − ``global_arrays`` (the aggregated update), ``velocity`` is set
    to v = ``momentum`` · v + Δ (in place, float64; a missing key starts at 0) and the
    result is ``global_arrays`` + ``learning_rate`` · v, cast to the global arrays' dtype.
    ``momentum = 0`` with ``learning_rate = 1`` returns ``combined`` itself (plain FedAvg,
    bit for bit). Source: Hsu, Qi, Brown, "Measuring the effects of non-identical data
    distribution for federated visual classification", 2019 (arXiv:1909.06335), FedAvgM;
    Reddi et al., "Adaptive federated optimization", ICLR 2021, Alg. 1 (server optimiser
    on the pseudo-gradient −Δ). Reads only DP outputs and the server's own state:
    post-processing, no privacy cost.
    """
    if momentum == 0.0 and learning_rate == 1.0:
        return dict(combined)
    out: dict[str, np.ndarray] = {}
    for key, value in combined.items():
        base = np.asarray(global_arrays[key], dtype=np.float64)
        delta = np.asarray(value, dtype=np.float64) - base
        v = velocity.get(key)
        v = delta if v is None else momentum * v + delta
        velocity[key] = v
        out[key] = (base + learning_rate * v).astype(np.asarray(global_arrays[key]).dtype)
    return out


def ema_step(average: dict[str, np.ndarray], arrays: Arrays, decay: float) -> None:
    """Fold this round's global ``arrays`` into their exponential moving average, in place.

    ``average`` (float64 per key) becomes γ · ``average`` + (1 − γ) · ``arrays`` with γ =
    ``decay``; a key it does not hold yet starts at ``arrays`` (w̄_1 = w_1, no bias
    towards the initial model). Source: parameter averaging, Polyak & Juditsky, "Acceleration
    of stochastic approximation by averaging", SIAM J. Control Optim. 1992; the EMA form
    used for DP-SGD by De et al., "Unlocking high-accuracy differentially private image
    classification through scale", 2022 (arXiv:2204.13650). Under DP the last model carries
    the noise of the last rounds nearly undamped; the average spreads it over ≈ (1 + γ)/(1 − γ)
    rounds. Reads only the global models, themselves DP outputs: post-processing.
    """
    for key, value in arrays.items():
        current = np.asarray(value, dtype=np.float64)
        previous = average.get(key)
        average[key] = (current.copy() if previous is None
                        else decay * previous + (1.0 - decay) * current)


def as_dtypes(average: Arrays, like: Arrays) -> dict[str, np.ndarray]:
    """``average`` cast to the dtypes of ``like`` (the global arrays), key by key."""
    return {k: np.asarray(v).astype(np.asarray(like[k]).dtype) for k, v in average.items()}
