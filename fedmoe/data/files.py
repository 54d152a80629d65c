"""Users' own data files: CSV, NumPy ``.npz``, image folders, saved Hugging Face datasets.

One spec names a file and how to read it, ``KIND:PATH``:

| spec            | what it reads                                                         |
|-----------------|-----------------------------------------------------------------------|
| ``csv:PATH``    | a header row, then one example a row: numeric feature columns and an integer label column (``label-column``, default ``label``) |
| ``npz:PATH``    | ``numpy.savez`` arrays ``x`` (N, ...) numeric features and ``y`` (N,) integer labels |
| ``images:DIR``  | one sub-folder per class, holding image files (PIL); all images the same size |
| ``hf:DIR``      | ``datasets.Dataset.save_to_disk(DIR)``: a label column and either an ``x`` column of feature vectors or numeric scalar columns |

Every file becomes ``x`` (N, F) float32 and ``y`` (N,) int64, labels in ``0..C-1``
(:class:`LabelledArrays`). Image folders map class folders to labels by their names: folders
named ``0``, ``1``, ... are those labels, other names are numbered in sorted order (every
client must then hold the same set of class folders). Images become grey-scale or RGB pixels
in [0, 1], flattened.

Every fault of a file is one :class:`DataFileError` that names the file, what is wrong and
how to fix it, raised while reading, before a client charges any privacy budget: a wrong
path, an empty file, a missing label column, a non-numeric column, NaN or ±inf, labels that
are not non-negative integers, a single class, too few rows, a feature count other than the
model's (:func:`check_shape`).
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from fedmoe.config import FILE_KINDS, ConfigError, FedMoEConfig, parse_range

#: The fewest rows a data file may hold: a client needs a train and a test split.
MIN_ROWS = 10
#: Image file suffixes an image folder is read for (others are ignored).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class DataFileError(ConfigError):
    """A user's data file cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class LabelledArrays:
    """A data file's examples: ``x`` (N, F) float32 features, ``y`` (N,) int64 labels;
    ``names``: the F feature columns' names where the file has them (CSV, a saved dataset
    of scalar columns), else None."""

    x: np.ndarray
    y: np.ndarray
    names: tuple[str, ...] | None = None

    @property
    def num_features(self) -> int:
        return int(self.x.shape[1])

    @property
    def num_classes(self) -> int:
        """Classes the labels imply: the largest label + 1."""
        return int(self.y.max()) + 1


def parse_spec(spec: str) -> tuple[str, Path]:
    """``"csv:PATH"`` -> ``("csv", Path(PATH))``.

    Raises
    ------
    DataFileError
        If the kind is not one of :data:`fedmoe.config.FILE_KINDS` or the path is empty.
    """
    kind, sep, path = spec.partition(":")
    if not sep or kind not in FILE_KINDS or not path.strip():
        raise DataFileError(
            f"data spec {spec!r}: expected KIND:PATH with KIND one of {FILE_KINDS}, e.g. "
            "'csv:/data/clinic.csv', 'npz:/data/x.npz', 'images:/data/scans', 'hf:/data/saved'")
    return kind, Path(path).expanduser()


def load_file(spec: str, label_column: str = "label", feature_bounds: str = "") -> LabelledArrays:
    """Read and check the data file ``spec`` (``KIND:PATH``); cached per process. With
    ``feature_bounds`` (the run config's ``feature-bounds``), each feature is mapped from
    its public range [low, high] to [0, 1], values outside it clipped (:func:`scale_to_bounds`).

    Returns
    -------
    LabelledArrays
        ``x`` (N, F) float32, ``y`` (N,) int64 in ``0..C-1``.

    Raises
    ------
    DataFileError
        For every fault the module docstring lists, and for bounds that cannot be used,
        naming the file and the fix.
    """
    kind, path = parse_spec(spec)
    if feature_bounds and kind == "images":
        raise DataFileError(f"{path}: an image folder is read as pixels in [0, 1] already; "
                            "leave feature-bounds empty")
    arrays = _load(kind, str(path.resolve()), label_column)
    return scale_to_bounds(arrays, feature_bounds) if feature_bounds else arrays


@lru_cache(maxsize=16)
def _load(kind: str, path: str, label_column: str) -> LabelledArrays:
    where = Path(path)
    if kind == "images":
        if not where.is_dir():
            raise DataFileError(f"{where}: no such folder; an image data set is a folder with "
                                "one sub-folder of images per class (images:DIR)")
    elif not where.exists():
        raise DataFileError(f"{where}: no such {'folder' if kind == 'hf' else 'file'}; check "
                            "the path (data-path in --node-config, or the dataset key)")
    elif kind != "hf" and where.is_dir():
        raise DataFileError(f"{where}: is a folder; {kind}:PATH names a file")
    reader = {"csv": _read_csv, "npz": _read_npz, "images": _read_images, "hf": _read_hf}[kind]
    x, y, names = reader(where, label_column)
    return _checked(where, x, y, names)


def _checked(path: Path, x: np.ndarray, y: np.ndarray,
             names: list[str] | None = None) -> LabelledArrays:
    """Check what every reader returns: rows, finiteness, integer labels, two classes."""
    if len(x) == 0:
        raise DataFileError(f"{path}: holds no examples; give a file with at least "
                            f"{MIN_ROWS} rows")
    if len(x) != len(y):
        raise DataFileError(f"{path}: {len(x):,} feature rows but {len(y):,} labels; every "
                            "example needs one label")
    x = x.reshape(len(x), -1)
    if x.shape[1] == 0:
        raise DataFileError(f"{path}: has no feature columns besides the label")
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise DataFileError(f"{path}: features are of type {x.dtype}, not real numbers; "
                            "encode categorical values as numbers first")
    bad = ~np.isfinite(x.astype(np.float64))
    if bad.any():
        row, col = map(int, np.argwhere(bad)[0])
        raise DataFileError(
            f"{path}: {int(bad.sum()):,} feature value(s) are NaN or ±inf (first at example "
            f"{row}, feature {col}); drop or impute those values")
    y = _integer_labels(path, y)
    if len(x) < MIN_ROWS:
        raise DataFileError(f"{path}: holds {len(x)} example(s); a client needs at least "
                            f"{MIN_ROWS} (its own train and test split): add rows")
    classes = np.unique(y)
    if len(classes) < 2:
        raise DataFileError(f"{path}: every example has label {int(classes[0])}; a classifier "
                            "needs examples of at least 2 classes")
    return LabelledArrays(np.ascontiguousarray(x, dtype=np.float32), y,
                          tuple(names) if names is not None else None)


def _integer_labels(path: Path, y: np.ndarray) -> np.ndarray:
    y = np.asarray(y).reshape(-1) if np.ndim(y) else np.asarray(y).reshape(1)
    if not np.issubdtype(y.dtype, np.number) or np.issubdtype(y.dtype, np.complexfloating):
        raise DataFileError(f"{path}: labels are of type {y.dtype}; labels must be class "
                            "numbers 0, 1, 2, ... (map class names to numbers first)")
    as_float = y.astype(np.float64)
    bad = ~np.isfinite(as_float) | (as_float != np.round(as_float)) | (as_float < 0)
    if bad.any():
        i = int(np.argmax(bad))
        raise DataFileError(f"{path}: label {y[i].item()!r} of example {i} is not a class number; "
                            "labels must be integers 0, 1, 2, ...")
    return as_float.astype(np.int64)


# ---------------------------------------------------------------------- readers
#: What every reader returns: features, labels and the feature columns' names (or None).
Read = tuple[np.ndarray, np.ndarray, "list[str] | None"]


def _read_csv(path: Path, label_column: str) -> Read:
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's BOM
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError) as err:
        raise DataFileError(f"{path}: cannot be read as UTF-8 CSV ({err})") from None
    rows = [r for r in rows if any(cell.strip() for cell in r)]
    if not rows:
        raise DataFileError(f"{path}: is empty; a CSV data file needs a header row and at "
                            f"least {MIN_ROWS} rows")
    header = [h.strip() for h in rows[0]]
    if label_column not in header:
        raise DataFileError(
            f"{path}: no label column {label_column!r} (columns: {', '.join(header[:12])}"
            f"{', ...' if len(header) > 12 else ''}); rename it, or set label-column to the "
            "column holding the labels")
    for i, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise DataFileError(f"{path}: line {i} has {len(row)} fields, the header "
                                f"{len(header)}; every row needs one value per column")
    values = np.empty((len(rows) - 1, len(header)), dtype=np.float64)
    for i, row in enumerate(rows[1:]):
        for j, cell in enumerate(row):
            try:
                values[i, j] = float(cell)
            except ValueError:
                raise DataFileError(
                    f"{path}: column {header[j]!r} holds {cell.strip()!r} (line {i + 2}), not "
                    "a number; every column must be numeric (encode categories as numbers, "
                    "or drop the column)") from None
    label = header.index(label_column)
    return (np.delete(values, label, axis=1), values[:, label],
            [h for j, h in enumerate(header) if j != label])


def _read_npz(path: Path, label_column: str) -> Read:
    try:
        with np.load(path, allow_pickle=False) as arrays:
            missing = [k for k in ("x", "y") if k not in arrays.files]
            if missing:
                raise DataFileError(
                    f"{path}: lacks array(s) {missing} (it holds {arrays.files}); save with "
                    "numpy.savez(path, x=features, y=labels)")
            return np.asarray(arrays["x"]), np.asarray(arrays["y"]), None
    except DataFileError:
        raise
    except (OSError, ValueError, EOFError) as err:
        raise DataFileError(f"{path}: not a readable .npz file ({err}); save with "
                            "numpy.savez(path, x=features, y=labels)") from None


def _read_images(path: Path, label_column: str) -> Read:
    from PIL import Image, UnidentifiedImageError

    folders = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataFileError(f"{path}: has no class sub-folders; put each class's images in a "
                            "sub-folder named after the class (0/, 1/, ... or cat/, dog/)")
    labels = _folder_labels([f.name for f in folders])
    xs: list[np.ndarray] = []
    ys: list[int] = []
    mode = shape = first = None
    for folder in folders:
        for file in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            try:
                with Image.open(file) as image:
                    mode = mode or ("L" if image.mode in ("1", "L", "I", "F") else "RGB")
                    pixels = np.asarray(image.convert(mode), dtype=np.float32) / 255.0
            except (OSError, UnidentifiedImageError) as err:
                raise DataFileError(f"{file}: not a readable image ({err}); remove or "
                                    "replace it") from None
            if shape is None:
                shape, first = pixels.shape, file
            elif pixels.shape != shape:
                raise DataFileError(
                    f"{file}: image of shape {pixels.shape}, but {first} is {shape}; all "
                    "images must have the same size and colour mode (resize them first)")
            xs.append(pixels.reshape(-1))
            ys.append(labels[folder.name])
    if not xs:
        raise DataFileError(f"{path}: its class folders hold no image files "
                            f"({', '.join(IMAGE_SUFFIXES)})")
    return np.stack(xs), np.asarray(ys, dtype=np.int64), None


def _folder_labels(names: list[str]) -> dict[str, int]:
    """Class folder name -> label: integer names are the labels, others sorted order."""
    if all(n.isdigit() for n in names):
        return {n: int(n) for n in names}
    return {n: i for i, n in enumerate(sorted(names))}


def _read_hf(path: Path, label_column: str) -> Read:
    from datasets import Dataset, DatasetDict, load_from_disk

    try:
        data = load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as err:
        raise DataFileError(f"{path}: not a saved Hugging Face dataset ({err}); save one with "
                            "Dataset.save_to_disk(path)") from None
    if isinstance(data, DatasetDict):
        if len(data) != 1:
            raise DataFileError(f"{path}: a DatasetDict with splits {list(data)}; save one "
                                "split (data['train'].save_to_disk(path))")
        data = next(iter(data.values()))
    assert isinstance(data, Dataset)
    if label_column not in data.column_names:
        raise DataFileError(
            f"{path}: no label column {label_column!r} (columns: {data.column_names}); rename "
            "it, or set label-column to the column holding the labels")
    columns = data.with_format("numpy")[:]
    y = np.asarray(columns[label_column])
    names = None
    if "x" in data.column_names:
        x = _numeric(path, "x", columns["x"])
    else:
        names = [c for c in data.column_names if c != label_column]
        x = np.stack([_numeric(path, c, columns[c]) for c in names], axis=1) if names \
            else np.empty((len(y), 0))
        if x.ndim > 2:
            raise DataFileError(f"{path}: columns hold arrays; put the feature vector in one "
                                "column named 'x'")
    return x, y, names


def _numeric(path: Path, name: str, values: object) -> np.ndarray:
    try:
        array = np.asarray(values)
        if array.dtype == object:
            array = np.stack([np.asarray(v) for v in array])
    except ValueError:
        raise DataFileError(f"{path}: column {name!r} holds rows of different lengths; every "
                            "example needs the same number of features") from None
    if not np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_:
        raise DataFileError(f"{path}: column {name!r} is of type {array.dtype}, not numeric; "
                            "encode it as numbers or drop it")
    return array


# ---------------------------------------------------------------- feature bounds
#: A data file without ``feature-bounds`` whose features reach beyond this magnitude gets
#: a warning (:func:`scale_warning`): DP-SGD clips each example's gradient to C, and a
#: linear model's gradient grows with the features, so a feature in the thousands (an
#: area, an income) takes all of it and the others learn nothing.
SCALE_WARNING_LIMIT = 100.0
#: ``feature-bounds`` that clip more than this share of a feature's values in a data file
#: get a warning (:func:`scale_warning`): a public range that misses the data (another
#: unit, another column's range) leaves that feature nearly constant after the map.
CLIP_WARNING_SHARE = 0.05


def feature_bounds(spec: str, num_features: int,
                   names: tuple[str, ...] | None) -> tuple[np.ndarray, np.ndarray]:
    """The public range of each of ``num_features`` features, from ``feature-bounds``:
    ``"LOW:HIGH"`` for all, or the path of a CSV file with a header ``feature,low,high`` and
    one row per feature, ``feature`` its column name where the file has names (``names``),
    else its 0-based index. Returns (low, high), each (num_features,) float64.

    Raises
    ------
    DataFileError
        Naming the bounds file and the fix: unreadable, another header, a value that is not
        a number, low ≥ high, a feature not in the data, one listed twice or one missing.
    """
    whole = parse_range(spec)  # None: not LOW:HIGH, so the path of a bounds file
    if whole is not None:
        return np.full(num_features, whole[0]), np.full(num_features, whole[1])
    path = Path(spec.strip()).expanduser()
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's BOM
            rows = [r for r in csv.reader(f) if any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError) as err:
        raise DataFileError(f"feature-bounds {spec!r}: not a range LOW:HIGH (two numbers, "
                            f"e.g. '0:100') and not a readable bounds file ({err}); give one "
                            "range for every feature, or the path of a CSV file with a "
                            "header feature,low,high") from None
    if not rows or [c.strip().lower() for c in rows[0]] != ["feature", "low", "high"]:
        raise DataFileError(f"feature-bounds {path}: the header must be feature,low,high, "
                            f"got {','.join(rows[0]) if rows else 'an empty file'!r} (one row "
                            "per feature: its column name, or its 0-based index in a file "
                            "without names, then its public lowest and highest value, "
                            "comma-separated)")
    index = {name: j for j, name in enumerate(names or ())}
    if names and len(index) < len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise DataFileError(f"feature-bounds {path}: the data has more than one column named "
                            f"{', '.join(map(repr, twice))}; rename them so that each bounds "
                            "row names one column")
    low, high = np.full(num_features, np.nan), np.full(num_features, np.nan)
    for line, row in enumerate(rows[1:], start=2):
        where = f"feature-bounds {path}, line {line}"
        if len(row) != 3:
            raise DataFileError(f"{where}: {len(row)} fields; each row is feature,low,high")
        name = row[0].strip()
        if names:  # a file with column names is keyed by them (a name may be "1")
            j = index.get(name)
        else:
            j = int(name) if name.isascii() and name.isdigit() else None
        if j is None or not 0 <= j < num_features:
            known = (f"the data's columns: {', '.join(names[:12])}"
                     f"{', ...' if len(names) > 12 else ''}" if names
                     else f"indices 0..{num_features - 1}")
            raise DataFileError(f"{where}: feature {name!r} is not in the data ({known})")
        if not np.isnan(low[j]):
            raise DataFileError(f"{where}: feature {name!r} is listed twice")
        try:
            low[j], high[j] = float(row[1]), float(row[2])
        except ValueError:
            raise DataFileError(f"{where}: low and high must be numbers, got "
                                f"{row[1].strip()!r}, {row[2].strip()!r}") from None
        if not (np.isfinite([low[j], high[j]]).all() and low[j] < high[j]):
            raise DataFileError(f"{where}: feature {name!r} needs finite low < high, got "
                                f"{low[j]:g}, {high[j]:g}")
    missing = np.flatnonzero(np.isnan(low))
    if len(missing):
        shown = [names[j] if names else str(j) for j in missing[:8]]
        raise DataFileError(f"feature-bounds {path}: no bounds for {len(missing)} feature(s) "
                            f"({', '.join(shown)}{', ...' if len(missing) > 8 else ''}); "
                            "every feature needs a row")
    return low, high


def scale_to_bounds(arrays: LabelledArrays, spec: str) -> LabelledArrays:
    """Each feature mapped from its public range [low, high] (:func:`feature_bounds`) to
    [0, 1] by (x − low)/(high − low), values outside the range clipped to it. The bounds
    are public (the user's knowledge of the domain, not read from the data), so the map is
    the same data-independent function of every record: it costs no privacy.

    Raises
    ------
    DataFileError
        If the bounds cannot be used (:func:`feature_bounds`).
    """
    low, high = _bounds_of(spec, arrays)
    scaled = (np.clip(arrays.x.astype(np.float64), low, high) - low) / (high - low)
    return LabelledArrays(scaled.astype(np.float32), arrays.y, arrays.names)


def scale_warning(spec: str, arrays: LabelledArrays, bounds: str = "") -> str | None:
    """A warning for a data file whose features are on a scale DP-SGD learns little from,
    naming the worst ones and the fix; else None. Without ``bounds`` (``feature-bounds``):
    features that reach beyond ±:data:`SCALE_WARNING_LIMIT`. With them (``arrays`` as read,
    before the map): features with more than :data:`CLIP_WARNING_SHARE` of their values
    outside their bounds, which the map clips to the bound. Read from the local data for
    the data owner's own console or log, never sent.

    Raises
    ------
    DataFileError
        If the bounds cannot be used (:func:`feature_bounds`).
    """
    if bounds:
        return _clip_warning(spec, arrays, bounds)
    peak = np.abs(arrays.x).max(axis=0)  # (F,)
    off, named = _worst(arrays, peak, SCALE_WARNING_LIMIT, lambda j: f" up to {peak[j]:,.4g}")
    if not off:
        return None
    return (f"{spec}: {off} feature(s) reach beyond ±{SCALE_WARNING_LIMIT:g} ({named}). "
            "DP-SGD clips each example's gradient to max-grad-norm, so the largest features "
            "take all of it and the model learns little from the rest: give every feature's "
            "public range with feature-bounds ('LOW:HIGH', or a CSV file feature,low,high), "
            "or scale the file to about [0, 1] with bounds you know without the data")


def _clip_warning(spec: str, arrays: LabelledArrays, bounds: str) -> str | None:
    low, high = _bounds_of(bounds, arrays)
    outside = ((arrays.x < low) | (arrays.x > high)).mean(axis=0)  # (F,) share clipped
    off, named = _worst(arrays, outside, CLIP_WARNING_SHARE,
                        lambda j: f": {outside[j]:.0%} outside [{low[j]:g}, {high[j]:g}]")
    if not off:
        return None
    return (f"{spec}: {off} feature(s) have more than {CLIP_WARNING_SHARE:.0%} of their "
            f"values outside their feature-bounds ({named}). Those values are clipped to the "
            "bound, so the feature tells the model little: check the bounds (their units, or "
            "a range meant for another column)")


def _bounds_of(spec: str, arrays: LabelledArrays) -> tuple[np.ndarray, np.ndarray]:
    """:func:`feature_bounds` for ``arrays``; a LOW:HIGH that is not a range as DataFileError."""
    try:
        return feature_bounds(spec, arrays.num_features, arrays.names)
    except ValueError as err:
        raise DataFileError(str(err)) from None


def _worst(arrays: LabelledArrays, score: np.ndarray, limit: float,
           describe) -> tuple[int, str]:
    """How many features have ``score`` (F,) above ``limit``, and the three highest named,
    each followed by ``describe(j)``."""
    off = np.flatnonzero(score > limit)
    worst = off[np.argsort(-score[off])][:3]
    return len(off), ", ".join(f"{arrays.names[j] if arrays.names else f'feature {j}'}"
                               f"{describe(j)}" for j in worst)


def fingerprint(path: Path) -> str:
    """SHA-256 (hex) of a data or bounds file's bytes; of a folder (an image folder, a saved
    Hugging Face dataset), of each file's path relative to it and its bytes, in sorted order.

    Raises
    ------
    DataFileError
        If it (or a file in the folder) cannot be read.
    """
    digest = hashlib.sha256()
    try:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            if file != path:
                digest.update(f"\0{file.relative_to(path).as_posix()}\0".encode())
            with file.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):  # noqa: B023
                    digest.update(block)
    except OSError as err:
        raise DataFileError(f"{path}: cannot be read ({err.strerror or err})") from None
    return digest.hexdigest()


def input_fingerprints(config: FedMoEConfig) -> dict[str, str]:
    """``{run-config key: sha256}`` of the files a simulation reads because its run config
    names them: the data set of a ``KIND:PATH`` dataset, and the bounds file of a
    ``feature-bounds`` that is not a range. A resumed run compares them with the ones its
    checkpoint recorded (a file edited in between would silently change what the rest of
    the run trains on). A deployment's data is on its nodes: none here.

    Raises
    ------
    DataFileError
        If a named file cannot be read.
    """
    if not config.is_file_data:
        return {}
    prints = {"dataset": fingerprint(parse_spec(config.dataset)[1])}
    if config.feature_bounds and parse_range(config.feature_bounds) is None:
        prints["feature-bounds"] = fingerprint(Path(config.feature_bounds.strip()).expanduser())
    return prints


def changed_inputs(recorded: Mapping[str, str],
                   config: FedMoEConfig) -> dict[str, tuple[str, str]]:
    """The files of ``recorded`` (:func:`input_fingerprints` when a run started) whose bytes
    differ now: ``{run-config key: (SHA-256 then, now)}``, "none" now for a key the run
    config no longer names. Empty ``recorded`` (a run recorded before fingerprints): {}.

    Raises
    ------
    DataFileError
        If a named file cannot be read now.
    """
    now = input_fingerprints(config) if recorded else {}  # hashes each file once
    return {key: (then, now.get(key, "none")) for key, then in recorded.items()
            if now.get(key) != then}


def changed_message(changed: Mapping[str, tuple[str, str]], config: FedMoEConfig) -> str:
    """The files :func:`changed_inputs` found, for an error message: each key with the
    path the run config gives, then the first one's SHA-256 prefixes then and now."""
    names = "; ".join(f"{key} = {config.to_run_config()[key]!r}" for key in changed)
    then, now = next(iter(changed.values()))
    return f"{names}: SHA-256 {then[:12]}… then, {now[:12]}… now"


def check_shape(path: str, data: LabelledArrays, num_features: int, num_classes: int) -> None:
    """The file must fit the run's model: ``num_features`` inputs, labels below ``num_classes``.

    Raises
    ------
    DataFileError
        Naming the file, what it holds, what the model expects, and the fix.
    """
    if data.num_features != num_features:
        raise DataFileError(
            f"{path}: examples have {data.num_features:,} features, the run's model takes "
            f"{num_features:,} (num-features); every client's file needs the same feature "
            "columns, in the same order")
    if data.num_classes > num_classes:
        raise DataFileError(
            f"{path}: holds label {data.num_classes - 1}, but the run's model has "
            f"{num_classes} classes (num-classes, labels 0..{num_classes - 1}); raise "
            "num-classes or relabel")


def infer_spec(path: str) -> str:
    """A node's ``data-path`` as a spec: ``KIND:PATH`` as given, else the kind from the path
    (``.csv`` -> csv, ``.npz`` -> npz, a folder holding ``dataset_info.json`` -> hf, any
    other folder -> images).

    Raises
    ------
    DataFileError
        If the kind cannot be told from the path.
    """
    kind, sep, _ = path.partition(":")
    if sep and kind in FILE_KINDS:
        return path
    where = Path(path).expanduser()
    if where.suffix.lower() in (".csv", ".npz"):
        return f"{where.suffix.lower()[1:]}:{where}"
    if where.is_dir():
        saved = (where / "dataset_info.json").exists() or (where / "dataset_dict.json").exists()
        return f"{'hf' if saved else 'images'}:{where}"
    if not where.exists():
        raise DataFileError(f"{where}: no such file or folder; check data-path in the node "
                            "config")
    raise DataFileError(f"{where}: cannot tell the data format from the name; write "
                        "data-path as KIND:PATH with KIND one of " + str(FILE_KINDS))
