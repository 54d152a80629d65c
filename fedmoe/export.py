"""``fedmoe export``: a client's personalised model for inference, optionally compressed.

The personalised model is the run's final global ``shared``+``gate`` tensors
(``global_model.pt`` in the run folder) merged with the client's own ``local`` tensors (its
local experts and label prior, from its state dir) — exactly the model its last evaluation
scored. Compression, applied in this order when several are asked for:

- ``distill``: a small dense student (64 → ``hidden`` → classes, ReLU) trained on the
  client's own training split to match the personalised model's temperature-softened
  class probabilities (Hinton et al. 2015), on the client's machine;
- ``prune``: magnitude pruning (``torch.nn.utils.prune``, global L1 over every ``Linear``
  weight), made permanent;
- ``int8``: post-training dynamic quantisation (``torch.ao.quantization.quantize_dynamic``):
  ``Linear`` weights stored as int8 with a per-tensor scale, activations quantised per
  batch at run time.

Privacy (``docs/architecture.md``): the personalised model and anything computed from it
alone (int8, pruning) are post-processing of DP-SGD's output and the DP label histogram,
so they carry the client's (ε, δ) guarantee whoever sees them. The distilled student is
different: it is trained on the client's raw data *without* DP, like nothing else in
fedmoe, so it carries **no** DP guarantee; it is meant for the data holder's own inference
and must stay with the client, like the data (the file says so, ``dp_protected``).

The file is ``torch.save`` of a dict (a pickle: load only files you made, with
:func:`load_export`).
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

#: Written by the server next to ``results.json``: the final global shared+gate tensors.
GLOBAL_MODEL = "global_model.pt"
FORMAT = "fedmoe-export-1"
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
    """One model on the client's test split: ``size_bytes`` (its serialised state dict),
    ``param_bytes`` (its tensors' storage: 4 bytes a float32 entry, 1 an int8 weight plus
    its scale and zero point), ``latency_us`` (median microseconds per example, one example
    at a time, on the calling thread settings: :func:`export_client` uses one thread),
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
                          "run (runs written before fedmoe kept the final model cannot be "
                          "exported)")
    found = sorted(p.parent for p in (run_dir / "clients").rglob(LOCAL_FILE)
                   if p.parent.name == client)
    if len(found) != 1:
        known = sorted({p.parent.name for p in (run_dir / "clients").rglob(LOCAL_FILE)})
        raise ExportError(f"{'no' if not found else 'more than one'} state of client "
                          f"{client!r} in {run_dir / 'clients'}; clients with local experts "
                          f"there: {', '.join(known[:10]) or 'none'}")
    return found[0]


def run_config(run_dir: Path) -> FedMoEConfig:
    try:
        results = json.loads((run_dir / "results.json").read_text())
        return FedMoEConfig.from_run_config(results["config"])
    except (OSError, KeyError, ValueError) as err:
        raise ExportError(f"cannot read the run's config from {run_dir / 'results.json'}: "
                          f"{err}") from err


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
def quantize_int8(model: nn.Module) -> nn.Module:
    """Dynamic int8 quantisation of every ``Linear`` (a quantised copy; ``model`` is kept)."""
    import warnings

    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():  # torch 2.13 announces the quantised dtypes' deprecation
        warnings.simplefilter("ignore", UserWarning)
        return quantize_dynamic(_copy(model), {nn.Linear}, dtype=torch.qint8)


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


# ---------------------------------------------------------------------- measuring
def state_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s serialised state dict (``torch.save``; int8 weights count 1 byte)."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def param_bytes(model: nn.Module) -> int:
    """Storage of ``model``'s tensors: element size × count (a dynamic-quantised ``Linear``:
    its int8 weight, float32 bias, and a float64 scale and int64 zero point)."""
    size = 0
    for module in model.modules():
        if callable(getattr(module, "weight", None)):  # dynamic-quantised Linear: packed
            weight, bias = module.weight(), module.bias()
            size += weight.numel() * weight.element_size() + 16
            size += 0 if bias is None else bias.numel() * bias.element_size()
            continue
        for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            size += t.numel() * t.element_size()
    return size


def _counts(model: nn.Module) -> tuple[int, int]:
    """(parameters, non-zero parameters) of ``model``, int8-packed weights included."""
    total = nonzero = 0
    for module in model.modules():
        if callable(getattr(module, "weight", None)):  # dynamic-quantised Linear: packed
            tensors = [module.weight().dequantize(), module.bias()]
        else:
            tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        for t in tensors:
            if t is not None and t.is_floating_point():
                total += t.numel()
                nonzero += int(torch.count_nonzero(t))
    return total, nonzero


@torch.no_grad()
def measure(name: str, model: nn.Module, test: TensorDataset,
            reference: torch.Tensor | None = None, *, repeats: int = 3) -> Measurement:
    """Size, latency per example and accuracy of ``model`` on ``test``; ``reference``: the
    uncompressed model's predicted classes (agreement). Latency: the median over examples
    of the best of ``repeats`` timings of a one-example forward pass, on one thread."""
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
    return Measurement(name, state_bytes(model), param_bytes(model), total, nonzero,
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
        model = quantize_int8(model)
        names.append("int8")
    if names:
        results.append(measure("+".join(names), model, data.test, predicted))
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "client": client, "run-config": config.to_run_config(),
                "compression": names, "dp_protected": not distill_hidden,
                "model": model, "measurements": [asdict(m) for m in results]}, buffer)
    write_atomic(out, buffer.getvalue())
    return results


def load_export(path: Path) -> dict[str, Any]:
    """An export file's dict; ``["model"]`` maps features (B, D) to logits (B, C).

    Raises
    ------
    ExportError
        If the file is not a fedmoe export.
    """
    try:
        payload = torch.load(path, weights_only=False)
    except Exception as err:  # noqa: BLE001  (a corrupt or foreign file)
        raise ExportError(f"{path} is not a readable fedmoe export: {err}") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ExportError(f"{path} is not a fedmoe export ({FORMAT})")
    return payload
