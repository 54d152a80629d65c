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
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from fedmoe.config import FILE_KINDS, ConfigError

#: The fewest rows a data file may hold: a client needs a train and a test split.
MIN_ROWS = 10
#: Image file suffixes an image folder is read for (others are ignored).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class DataFileError(ConfigError):
    """A user's data file cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class LabelledArrays:
    """A data file's examples: ``x`` (N, F) float32 features, ``y`` (N,) int64 labels."""

    x: np.ndarray
    y: np.ndarray

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


def load_file(spec: str, label_column: str = "label") -> LabelledArrays:
    """Read and check the data file ``spec`` (``KIND:PATH``); cached per process.

    Returns
    -------
    LabelledArrays
        ``x`` (N, F) float32, ``y`` (N,) int64 in ``0..C-1``.

    Raises
    ------
    DataFileError
        For every fault the module docstring lists, naming the file and the fix.
    """
    kind, path = parse_spec(spec)
    return _load(kind, str(path.resolve()), label_column)


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
    x, y = reader(where, label_column)
    return _checked(where, x, y)


def _checked(path: Path, x: np.ndarray, y: np.ndarray) -> LabelledArrays:
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
    return LabelledArrays(np.ascontiguousarray(x, dtype=np.float32), y)


def _integer_labels(path: Path, y: np.ndarray) -> np.ndarray:
    y = np.asarray(y).reshape(-1) if np.ndim(y) else np.asarray(y).reshape(1)
    if not np.issubdtype(y.dtype, np.number) or np.issubdtype(y.dtype, np.complexfloating):
        raise DataFileError(f"{path}: labels are of type {y.dtype}; labels must be class "
                            "numbers 0, 1, 2, ... (map class names to numbers first)")
    as_float = y.astype(np.float64)
    bad = ~np.isfinite(as_float) | (as_float != np.round(as_float)) | (as_float < 0)
    if bad.any():
        i = int(np.argmax(bad))
        raise DataFileError(f"{path}: label {y[i]!r} of example {i} is not a class number; "
                            "labels must be integers 0, 1, 2, ...")
    return as_float.astype(np.int64)


# ---------------------------------------------------------------------- readers
def _read_csv(path: Path, label_column: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open(newline="", encoding="utf-8") as f:
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
    return np.delete(values, label, axis=1), values[:, label]


def _read_npz(path: Path, label_column: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as arrays:
            missing = [k for k in ("x", "y") if k not in arrays.files]
            if missing:
                raise DataFileError(
                    f"{path}: lacks array(s) {missing} (it holds {arrays.files}); save with "
                    "numpy.savez(path, x=features, y=labels)")
            return np.asarray(arrays["x"]), np.asarray(arrays["y"])
    except DataFileError:
        raise
    except (OSError, ValueError, EOFError) as err:
        raise DataFileError(f"{path}: not a readable .npz file ({err}); save with "
                            "numpy.savez(path, x=features, y=labels)") from None


def _read_images(path: Path, label_column: str) -> tuple[np.ndarray, np.ndarray]:
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
    return np.stack(xs), np.asarray(ys, dtype=np.int64)


def _folder_labels(names: list[str]) -> dict[str, int]:
    """Class folder name -> label: integer names are the labels, others sorted order."""
    if all(n.isdigit() for n in names):
        return {n: int(n) for n in names}
    return {n: i for i, n in enumerate(sorted(names))}


def _read_hf(path: Path, label_column: str) -> tuple[np.ndarray, np.ndarray]:
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
    if "x" in data.column_names:
        x = _numeric(path, "x", columns["x"])
    else:
        names = [c for c in data.column_names if c != label_column]
        x = np.stack([_numeric(path, c, columns[c]) for c in names], axis=1) if names \
            else np.empty((len(y), 0))
        if x.ndim > 2:
            raise DataFileError(f"{path}: columns hold arrays; put the feature vector in one "
                                "column named 'x'")
    return x, y


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
