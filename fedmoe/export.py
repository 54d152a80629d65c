"""``fedmoe export``: a client's personalised model for inference, optionally compressed.

The personalised model is the run's released global ``shared``+``gate`` tensors
(``global_model.pt`` in the run folder) merged with the client's own ``local`` tensors (its
local experts and label prior, from its state dir) — exactly the model its last evaluation
scored. Compression, applied in this order when several are asked for:

- ``distill``: a small dense student (64 → ``hidden`` → classes, ReLU) trained on the
  client's own training split to match the personalised model's temperature-softened
  class probabilities (Hinton et al. 2015), on the client's machine;
- ``prune``: magnitude pruning (``torch.nn.utils.prune``, global L1 over every ``Linear``
  weight), made permanent;
- ``int8``: post-training quantisation for storage (:func:`store_tensors`): every
  floating tensor of the model (weights, biases, the label prior) is written as int8 codes
  with a per-tensor affine scale and zero point (``torch.ao.quantization``'s
  ``MinMaxObserver`` and its quantise/dequantise ops), and dequantised to float32 at load.
  Error bound: each entry moves by at most half its tensor's step,
  ``|x̂ − x| ≤ s/2`` with ``s = (max(x, 0) − min(x, 0)) / 255``; zero stays exactly zero
  (pruned weights stay pruned).

Privacy (``docs/architecture.md``): the personalised model and anything computed from it
alone (int8, pruning) are post-processing of DP-SGD's output and the DP label histogram,
so they carry the client's (ε, δ) guarantee whoever sees them. The distilled student is
different: it is trained on the client's raw data *without* DP, like nothing else in
fedmoe, so it carries **no** DP guarantee; it is meant for the data holder's own inference
and must stay with the client, like the data (the file says so, ``dp_protected``).

The file is ``torch.save`` of a dict (a pickle: load only files you made, with
:func:`load_export`): the model's structure with no tensor data (a copy on the ``meta``
device) and its tensors as :func:`store_tensors` writes them — float32 as they are, or
int8 codes and their scales and zero points — so the tensor bytes in the file are exactly
:func:`stored_bytes`.
"""

from __future__ import annotations

import io
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from fedmoe.config import ConfigError, FedMoEConfig, NodeSettings
from fedmoe.models.layers import set_use_local
from fedmoe.roles import Role, merge_state_dict

#: Written by the server next to ``results.json``: the released global shared+gate tensors
#: (with ``ema-decay`` > 0 their moving average over rounds).
GLOBAL_MODEL = "global_model.pt"
FORMAT = "fedmoe-export-2"
FORMAT_1 = "fedmoe-export-1"  # the whole module pickled; still loaded
MAX_STUDENT_WIDTH = 100_000
LOCAL_FILE = "local_experts.pt"  # clients.state.LOCAL_FILE (clients/ imports fedmoe, not back)


class ExportError(ConfigError):
    """The run folder, client or options cannot give an export; the message says the fix."""


class Personalised(nn.Module):
    """Inference wrapper: the personalised model's logits (B, C), local experts and label
    prior on."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        set_use_local(model, True)
        model.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[0]  # (B, C)


class Student(nn.Module):
    """The dense student: features (B, D) → ReLU(hidden) → logits (B, C)."""

    def __init__(self, in_features: int, hidden: int, classes: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))  # (B, C)


@dataclass(frozen=True)
class Measurement:
    """One model on the client's test split: ``size_bytes`` (its stored tensors
    serialised with ``torch.save``, envelope included), ``param_bytes`` (the bytes needed
    to rebuild its tensors, :func:`stored_bytes`: 4 a float32 entry; int8: 1 a code plus a
    float32 scale and an int8 zero point per tensor), ``latency_us`` (median microseconds
    per example, one example at a time, on the calling thread settings:
    :func:`export_client` uses one thread),
    ``accuracy`` and ``agreement`` (share of test examples whose predicted class equals
    the uncompressed personalised model's)."""

    name: str
    size_bytes: int
    param_bytes: int
    parameters: int
    nonzero: int
    latency_us: float
    accuracy: float
    agreement: float


# ------------------------------------------------------------------------ loading
def find_client_dir(run_dir: Path, client: str) -> Path:
    """The state dir of ``client`` inside a run folder (``clients/<client>`` from an
    experiment, ``clients/run-<id>/<client>`` from ``fedmoe simulate``).

    Raises
    ------
    ExportError
        If the run folder has no global model or no state of that client.
    """
    if not (run_dir / GLOBAL_MODEL).is_file():
        raise ExportError(f"{run_dir} has no {GLOBAL_MODEL}: pass the folder of a finished "
                          "run. A run interrupted before its last round has none yet: finish "
                          f"it with `fedmoe simulate --resume {run_dir}` (runs written before "
                          "fedmoe kept the final model cannot be exported)")
    found = sorted(p.parent for p in (run_dir / "clients").rglob(LOCAL_FILE)
                   if p.parent.name == client)
    if len(found) != 1:
        known = sorted({p.parent.name for p in (run_dir / "clients").rglob(LOCAL_FILE)})
        raise ExportError(f"{'no' if not found else 'more than one'} state of client "
                          f"{client!r} in {run_dir / 'clients'}; clients with local experts "
                          f"there: {', '.join(known[:10]) or 'none'}")
    return found[0]


def run_config(run_dir: Path) -> FedMoEConfig:
    """The run config the run in ``run_dir`` recorded, checked against the files it names:
    an export reads the client's data split again (to measure and to distill), so a data
    or bounds file edited since the run would silently measure, or train a student, on
    other records than the model trained and was tested on.

    Raises
    ------
    ExportError
        If ``results.json`` cannot be read, or a file the run config names changed since
        the run started (SHA-256 against the one ``results.json`` recorded; a run recorded
        before fingerprints has none to compare).
    fedmoe.data.files.DataFileError
        If a file the run config names cannot be read.
    """
    from fedmoe.data.files import changed_inputs, changed_message

    try:
        results = json.loads((run_dir / "results.json").read_text())
        config = FedMoEConfig.from_recorded(results["config"])
        recorded = {str(k): str(v) for k, v in results.get("inputs", {}).items()}
    except (OSError, KeyError, ValueError, AttributeError) as err:
        raise ExportError(f"cannot read the run's config from {run_dir / 'results.json'}: "
                          f"{err}") from err
    if changed := changed_inputs(recorded, config):
        raise ExportError(
            f"{run_dir}: the contents of the file(s) its run config names changed since the "
            f"run started ({changed_message(changed, config)}). The export would measure "
            "the model (and train a student) on other records than the ones it was trained "
            "and tested on; put the file(s) back as they were when the run trained")
    return config


def personalised_model(run_dir: Path, client: str,
                       node: NodeSettings) -> tuple[FedMoEConfig, Personalised]:
    """The client's personalised model as its last evaluation scored it.

    Raises
    ------
    ExportError
        For a run folder without the files, or a model that is not a classifier.
    """
    from fedmoe.methods import method_model

    config = run_config(run_dir)
    state = find_client_dir(run_dir, client)
    with torch.random.fork_rng():  # the client's own construction (clients.app.personal_model)
        torch.manual_seed(config.seed * 100_003 + node.partition_id)
        model = method_model(config, config.num_server_rounds)
    if getattr(model.task, "kind", "") != "classify":
        raise ExportError(f"fedmoe export handles single-task classifiers; model "
                          f"'{config.model}' is {model.task.kind}")
    merge_state_dict(model, torch.load(state / LOCAL_FILE, weights_only=True), {Role.LOCAL})
    merge_state_dict(model, torch.load(run_dir / GLOBAL_MODEL, weights_only=True))
    return config, Personalised(model)


# --------------------------------------------------------------------- compression
def prune_magnitude(model: nn.Module, amount: float) -> nn.Module:
    """A copy with the ``amount`` share of all ``Linear`` weights of smallest magnitude set
    to zero (global L1 pruning), made permanent.

    Raises
    ------
    ExportError
        If ``amount`` is not in [0, 1).
    """
    from torch.nn.utils import prune

    if not 0.0 <= amount < 1.0:
        raise ExportError(f"--prune must be in [0, 1) (share of weights removed), got {amount}")
    pruned = _copy(model)
    targets = [(m, "weight") for m in pruned.modules() if isinstance(m, nn.Linear)]
    if amount > 0 and targets:
        prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=amount)
        for module, name in targets:
            prune.remove(module, name)
    return pruned


def distill(teacher: nn.Module, train: TensorDataset, *, hidden: int = 32,
            temperature: float = 2.0, epochs: int = 300, mixup: int = 4,
            seed: int = 0) -> Student:
    """Train a :class:`Student` on the client's training inputs to match ``teacher``.

    The inputs are the client's training examples and ``mixup`` convex combinations of
    random pairs of them per example (more points at which to match the teacher, still
    from the client's data only). Loss: KL divergence between the temperature-softened
    distributions (× T²), full batch, Adam (lr 0.01), ``epochs`` steps.

    Raises
    ------
    ExportError
        If ``hidden`` < 1 or ``epochs`` < 1.
    """
    if hidden < 1 or epochs < 1:
        raise ExportError(f"student hidden width and epochs must be >= 1, got {hidden}, {epochs}")
    x = train.tensors[0].float()
    generator = torch.Generator().manual_seed(seed)
    parts = [x]
    for _ in range(mixup):
        other = x[torch.randperm(len(x), generator=generator)]
        lam = torch.rand(len(x), 1, generator=generator)
        parts.append(lam * x + (1 - lam) * other)
    inputs = torch.cat(parts)  # (N·(1+mixup), D)
    with torch.no_grad():
        target = F.log_softmax(teacher(inputs) / temperature, dim=-1)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        student = Student(x.shape[1], hidden, target.shape[1])
    optimizer = torch.optim.Adam(student.parameters(), lr=0.01)
    for _ in range(epochs):
        optimizer.zero_grad(set_to_none=True)
        log_p = F.log_softmax(student(inputs) / temperature, dim=-1)
        loss = F.kl_div(log_p, target, log_target=True, reduction="batchmean") * temperature ** 2
        loss.backward()
        optimizer.step()
    return student.eval()


def _copy(model: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


# -------------------------------------------------------------------- tensor storage
INT8_MIN, INT8_MAX = -128, 127
#: Bytes of one int8 tensor's quantisation parameters: a float32 scale, an int8 zero point.
QPARAM_BYTES = 4 + 1


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``model`` by dotted name (persistent or not, tied
    ones under each of their names): everything :func:`_assemble` must put back."""
    return {name: t.detach() for name, t in [*model.named_parameters(remove_duplicate=False),
                                             *model.named_buffers(remove_duplicate=False)]}


def _worth_int8(t: torch.Tensor) -> bool:
    """A floating tensor whose codes plus qparams take fewer bytes than the tensor (a
    float32 scalar, e.g. the expert switch, is kept exact: 4 bytes < 1 + 5)."""
    return t.is_floating_point() and t.numel() + QPARAM_BYTES < t.numel() * t.element_size()


def store_tensors(model: nn.Module, *, int8: bool) -> dict[str, Any]:
    """The tensors of ``model`` as an export stores them.

    Without ``int8`` every tensor is kept as it is (``"exact"``). With ``int8`` every
    floating tensor worth it (:func:`_worth_int8`: all but scalars) is quantised per tensor
    with an affine int8 scheme: ``torch.ao.quantization.MinMaxObserver`` (qint8,
    per-tensor affine) gives the scale ``s = (max(x, 0) − min(x, 0)) / 255`` (float32) and
    the zero point ``z`` ∈ [−128, 127]; the code of an entry is
    ``q = clamp(round(x / s) + z, −128, 127)``, read back as ``x̂ = (q − z) · s``.

    Error bound: ``|x̂ − x| ≤ s/2`` for every entry (up to float32 rounding), so at most
    ``(max x − min x) / 510`` when the range spans 0; an entry equal to 0 comes back as
    exactly 0.

    Returns
    -------
    dict
        ``"exact"``: {name: tensor} kept as they are; ``"int8"``: ``names``, ``shapes``,
        ``dtypes`` (T entries, the structure), ``codes`` (int8, (N,): the T tensors'
        codes, flattened and concatenated), ``scales`` (float32, (T,)), ``zero_points``
        (int8, (T,)).

    Raises
    ------
    ExportError
        If a tensor to quantise holds NaN or ±inf (it has no finite range).
    """
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantized_decomposed ops)
    from torch.ao.quantization.observer import MinMaxObserver

    exact: dict[str, torch.Tensor] = {}
    names: list[str] = []
    shapes: list[tuple[int, ...]] = []
    dtypes: list[torch.dtype] = []
    codes: list[torch.Tensor] = []
    scales: list[float] = []
    zero_points: list[int] = []
    for name, t in _tensors(model).items():
        if not (int8 and _worth_int8(t)):
            exact[name] = t.clone()
            continue
        x = t.float().flatten()  # (n,)
        if not torch.isfinite(x).all():
            raise ExportError(f"tensor {name} holds NaN or inf values: it cannot be quantised "
                              "(export it without --int8 to inspect it)")
        observer = MinMaxObserver(dtype=torch.qint8, qscheme=torch.per_tensor_affine)
        observer(x)
        scale, zero_point = (v.item() for v in observer.calculate_qparams())
        codes.append(torch.ops.quantized_decomposed.quantize_per_tensor(
            x, scale, zero_point, INT8_MIN, INT8_MAX, torch.int8))
        names.append(name)
        shapes.append(tuple(t.shape))
        dtypes.append(t.dtype)
        scales.append(scale)
        zero_points.append(zero_point)
    quantised = {"names": names, "shapes": shapes, "dtypes": dtypes,
                 "codes": torch.cat(codes) if codes else torch.zeros(0, dtype=torch.int8),
                 "scales": torch.tensor(scales, dtype=torch.float32),
                 "zero_points": torch.tensor(zero_points, dtype=torch.int8)}
    return {"exact": exact, "int8": quantised}


def load_tensors(stored: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors :func:`store_tensors` stored, by name: exact ones as they are, int8 ones
    dequantised, ``(q − z) · s``, to their original dtype and shape."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401

    tensors = dict(stored["exact"])
    q = stored["int8"]
    offset = 0
    for i, (name, shape, dtype) in enumerate(zip(q["names"], q["shapes"], q["dtypes"],
                                                 strict=True)):
        n = math.prod(shape)
        values = torch.ops.quantized_decomposed.dequantize_per_tensor(
            q["codes"][offset:offset + n], q["scales"][i].item(), int(q["zero_points"][i]),
            INT8_MIN, INT8_MAX, torch.int8)
        tensors[name] = values.reshape(shape).to(dtype)
        offset += n
    return tensors


def stored_bytes(stored: dict[str, Any]) -> int:
    """Every byte needed to rebuild the tensors from ``stored``: exact tensors at their
    element size (4 a float32 entry), int8 ones 1 a code plus :data:`QPARAM_BYTES` each.
    These are exactly the tensor data ``torch.save`` writes for ``stored`` (tested)."""
    q = stored["int8"]
    return (sum(t.numel() * t.element_size() for t in stored["exact"].values())
            + sum(q[k].numel() * q[k].element_size() for k in ("codes", "scales", "zero_points")))


def _skeleton(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every parameter and buffer on the ``meta`` device: its
    structure, no tensor data."""
    return _copy(model).to("meta")


def _assemble(skeleton: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """Put ``tensors`` (by name, from :func:`load_tensors`) into ``skeleton``, in place.

    Raises
    ------
    ExportError
        If a name is not the skeleton's, or a tensor of the skeleton is left without data.
    """
    try:
        for name, value in tensors.items():
            owner, _, leaf = name.rpartition(".")
            module = skeleton.get_submodule(owner)
            current = getattr(module, leaf)
            setattr(module, leaf, nn.Parameter(value, current.requires_grad)
                    if isinstance(current, nn.Parameter) else value)
    except AttributeError as err:
        raise ExportError(f"the export's tensors do not fit its model: {err}") from err
    missing = [name for name, t in _tensors(skeleton).items() if t.is_meta]
    if missing:
        raise ExportError(f"the export holds no data for {', '.join(missing[:5])}")
    return skeleton


def restored(model: nn.Module, stored: dict[str, Any]) -> nn.Module:
    """The model a loader of ``stored`` runs: a copy of ``model``'s structure holding the
    tensors read back from ``stored`` (for int8: the dequantised ones)."""
    return _assemble(_skeleton(model), load_tensors(stored))


# ---------------------------------------------------------------------- measuring
def param_bytes(model: nn.Module) -> int:
    """Storage of ``model``'s tensors as they are: element size × count (4 bytes a
    float32 entry), every parameter and buffer."""
    return stored_bytes(store_tensors(model, int8=False))


def _serialised_bytes(obj: Any) -> int:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getbuffer().nbytes


def _counts(model: nn.Module) -> tuple[int, int]:
    """(floating entries, non-zero floating entries) of ``model``'s tensors."""
    floating = [t for t in _tensors(model).values() if t.is_floating_point()]
    return (sum(t.numel() for t in floating),
            sum(int(torch.count_nonzero(t)) for t in floating))


@torch.no_grad()
def measure(name: str, model: nn.Module, test: TensorDataset,
            reference: torch.Tensor | None = None, *, stored: dict[str, Any] | None = None,
            repeats: int = 3) -> Measurement:
    """Size, latency per example and accuracy of ``model`` on ``test``; ``reference``: the
    uncompressed model's predicted classes (agreement); ``stored``: the tensors as written
    (:func:`store_tensors`; default: ``model``'s as they are) — ``model`` should be what a
    loader rebuilds from them (:func:`restored`). Latency: the median over examples of the
    best of ``repeats`` timings of a one-example forward pass, on one thread."""
    if stored is None:
        stored = store_tensors(model, int8=False)
    x, y = test.tensors[0].float(), test.tensors[1]
    predicted = model(x).argmax(-1)
    times = []
    for i in range(len(x)):
        one = x[i:i + 1]
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            model(one)
            best = min(best, time.perf_counter() - start)
        times.append(best)
    total, nonzero = _counts(model)
    agreement = (int((predicted == reference).sum()) / len(y)) if reference is not None else 1.0
    return Measurement(name, _serialised_bytes(stored), stored_bytes(stored), total, nonzero,
                       float(torch.tensor(times).median()) * 1e6,
                       int((predicted == y).sum()) / len(y), agreement)


# ------------------------------------------------------------------------- export
def export_client(
    run_dir: Path, client: str, out: Path, *, num_partitions: int | None = None,
    int8: bool = False, prune: float = 0.0, distill_hidden: int = 0,
    seed: int = 0,
) -> list[Measurement]:
    """Write ``client``'s (optionally compressed) personalised model to ``out`` and return
    the measurements of the uncompressed model and of the exported one.

    Parameters
    ----------
    run_dir : Path
        A finished run folder (``results.json``, ``global_model.pt``, ``clients/``).
    client : str
        The client id, ``partition-<p>`` in a simulation.
    out : Path
        The export file; written only after everything succeeded.
    num_partitions : int, optional
        Clients in the run (for the client's data split); default: the client state
        folders in the run folder.
    int8, prune, distill_hidden
        Compressions (module docstring): int8 quantisation, the share of weights pruned,
        the student's hidden width (0 = no distillation).
    seed : int (default: 0)
        The student's initialisation and mix-up draws.

    Raises
    ------
    ExportError
        For a run folder, client or option that cannot give an export.
    """
    if not 0.0 <= prune < 1.0:
        raise ExportError(f"--prune must be in [0, 1) (share of weights removed), got {prune}")
    if not 0 <= distill_hidden <= MAX_STUDENT_WIDTH:
        raise ExportError(f"--distill must be a hidden width in [1, {MAX_STUDENT_WIDTH:,}], got "
                          f"{distill_hidden}")
    if out.is_dir():
        raise ExportError(f"--out {out} is a folder; give a file path, e.g. {out / 'model.pt'}")
    find_client_dir(run_dir, client)  # a finished run that holds this client's state
    if not client.startswith("partition-") or not client[len("partition-"):].isdigit():
        raise ExportError(f"client {client!r}: fedmoe export reads a simulated client's data "
                          "split, so the client id must be partition-<p>")
    partition = int(client[len("partition-"):])
    if num_partitions is None:
        num_partitions = len({p.parent.name for p in (run_dir / "clients").rglob(LOCAL_FILE)})
    if not 0 <= partition < num_partitions:
        raise ExportError(f"client {client!r} is not among the {num_partitions} clients of "
                          f"{run_dir}; pass --num-partitions")
    node = NodeSettings(partition_id=partition, num_partitions=num_partitions)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: more threads only contend (17× slower on 2 busy cores)
    try:
        return _export(run_dir, client, out, node, int8=int8, prune=prune,
                       distill_hidden=distill_hidden, seed=seed)
    finally:
        torch.set_num_threads(threads)


def _export(run_dir: Path, client: str, out: Path, node: NodeSettings, *, int8: bool,
            prune: float, distill_hidden: int, seed: int) -> list[Measurement]:
    from fedmoe.data import load_client_data
    from fedmoe.storage import write_atomic

    partition, num_partitions = node.partition_id, node.num_partitions
    config, reference = personalised_model(run_dir, client, node)
    data = load_client_data(config, partition, num_partitions, config.phase(
        config.num_server_rounds))
    with torch.no_grad():
        predicted = reference(data.test.tensors[0].float()).argmax(-1)
    results = [measure("float32 personalised", reference, data.test, predicted)]
    model: nn.Module = reference
    names = []
    if distill_hidden:
        model = distill(reference, data.train, hidden=distill_hidden, seed=seed)
        names.append(f"student-{distill_hidden}")
    if prune:
        model = prune_magnitude(model, prune)
        names.append(f"pruned-{prune:g}")
    if int8:
        names.append("int8")
    stored = store_tensors(model, int8=int8)
    if names:  # measured as a loader rebuilds it from what is written
        results.append(measure("+".join(names), restored(model, stored), data.test,
                               predicted, stored=stored))
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "client": client, "run-config": config.to_run_config(),
                "compression": names, "dp_protected": not distill_hidden,
                "model": _skeleton(model), "tensors": stored,
                "measurements": [asdict(m) for m in results]}, buffer)
    write_atomic(out, buffer.getvalue())
    return results


def load_export(path: Path) -> dict[str, Any]:
    """An export file's dict; ``["model"]`` maps features (B, D) to logits (B, C): the
    stored structure filled with the stored tensors (int8 ones dequantised, float32).

    Raises
    ------
    ExportError
        If the file is not a fedmoe export, or its tensors do not fit its model.
    """
    try:
        payload = torch.load(path, weights_only=False)
    except Exception as err:  # noqa: BLE001  (a corrupt or foreign file)
        raise ExportError(f"{path} is not a readable fedmoe export: {err}") from err
    if not isinstance(payload, dict) or payload.get("format") not in (FORMAT, FORMAT_1):
        raise ExportError(f"{path} is not a fedmoe export ({FORMAT})")
    if payload["format"] == FORMAT:
        payload["model"] = _assemble(payload["model"], load_tensors(payload["tensors"]))
    return payload
