"""Data: IDX files offline (Fashion-MNIST from Debian's ``dataset-fashion-mnist``), TFDS names for users
with a network, per-worker shards (iid / Dirichlet non-iid), deterministic per-worker batches, and
the augmented-data workers' transforms (Lotka-Volterra pixel flow, Gaussian noise).
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "DataError",
    "Dataset",
    "DEBIAN_FASHION_MNIST",
    "read_idx",
    "write_idx",
    "find_idx_dir",
    "load_dataset",
    "synthetic_dataset",
    "shard_indices",
    "SHARD_SCHEMES",
    "WorkerSampler",
    "lotka_volterra_map",
    "LV_LEVELS",
]

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_HOW_TO = (
    "Get Fashion-MNIST offline with `apt-get install dataset-fashion-mnist` (as root; files land in "
    f"{DEBIAN_FASHION_MNIST}), or put the four IDX files "
    f"({', '.join(v + '.gz' for v in _IDX_FILES.values())}) "
    "in a folder and pass --data-dir or set FLAGJAX_DATA_DIR; with a network, use a TFDS name such as "
    "'tfds:fashion_mnist'."
)


class DataError(ValueError):
    """A data file is missing, truncated or malformed (the message names the file)."""


@dataclass(frozen=True)
class Dataset:
    """Images (N, H, W, C) float32 in [0, 1] and int32 labels, train and test."""

    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzipped): magic 0x0000TTNN, N big-endian uint32 dims, then data.

    Raises :class:`DataError` naming the file for a bad magic number, unknown type code, or a data
    section shorter or longer than the header says.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as err:
        raise DataError(f"cannot read IDX file {path}: {err}") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path} is not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise DataError(f"{path}: unknown IDX type code 0x{code:02x}")
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path}: truncated header (needs {ndim} dimensions)")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    body = raw[4 + 4 * ndim :]
    if len(body) != expected:
        raise DataError(
            f"{path}: data section has {len(body)} bytes but the header {dims} needs {expected} "
            f"({'truncated' if len(body) < expected else 'trailing bytes'})"
        )
    return np.frombuffer(body, dtype).reshape(dims).astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray, *, compress: bool | None = None) -> None:
    """Write ``array`` (uint8/int8/int16/int32/float32/float64) as an IDX file (gzip if path ends .gz)."""
    path = Path(path)
    array = np.asarray(array)
    codes = {np.dtype(v).newbyteorder("="): k for k, v in _IDX_DTYPES.items()}
    code = codes[array.dtype]
    header = bytes([0, 0, code, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    data = header + array.astype(np.dtype(_IDX_DTYPES[code])).tobytes()
    if compress or (compress is None and path.suffix == ".gz"):
        data = gzip.compress(data)
    path.write_bytes(data)


def _idx_path(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).exists():
            return folder / name
    return None


def find_idx_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding the four IDX files: ``data_dir``, then $FLAGJAX_DATA_DIR, then Debian's path.

    Raises ``FileNotFoundError`` saying how to get the data when none has them.
    """
    candidates = [data_dir, os.environ.get("FLAGJAX_DATA_DIR"), DEBIAN_FASHION_MNIST]
    tried = []
    for c in candidates:
        if not c:
            continue
        folder = Path(c)
        tried.append(str(folder))
        if all(_idx_path(folder, stem) for stem in _IDX_FILES.values()):
            return folder
    raise FileNotFoundError(f"no IDX data set found (looked in {', '.join(tried)}). {_HOW_TO}")


def _images(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32) / 255.0
    return x[..., None] if x.ndim == 3 else x


def load_dataset(name: str = "fashion_mnist", data_dir: str | os.PathLike | None = None) -> Dataset:
    """Load a data set by name.

    * ``"fashion_mnist"`` / ``"mnist"``: IDX files from ``data_dir``, $FLAGJAX_DATA_DIR or (Fashion-MNIST)
      Debian's ``/usr/share/datasets/fashion-mnist``; no network.
    * ``"synthetic"``: :func:`synthetic_dataset`, for smoke tests and ``--quick`` experiment runs.
    * ``"tfds:<name>"`` (e.g. ``tfds:cifar10``): through tensorflow-datasets' ``data_source`` (needs the
      ``flagjax[tfds]`` extra and a prepared or downloadable data set).
    """
    if name.startswith("tfds:"):
        return _load_tfds(name[5:], data_dir)
    if name == "synthetic":
        return synthetic_dataset()
    if name not in ("fashion_mnist", "mnist"):
        raise ValueError(f"dataset must be 'fashion_mnist', 'mnist', 'synthetic' or 'tfds:<name>'; got {name!r}")
    if name == "mnist" and data_dir is None and not os.environ.get("FLAGJAX_DATA_DIR"):
        raise FileNotFoundError("dataset 'mnist' needs --data-dir (a folder with MNIST's four IDX files)")
    folder = find_idx_dir(data_dir)
    arr = {k: read_idx(_idx_path(folder, stem)) for k, stem in _IDX_FILES.items()}
    for split in ("train", "test"):
        n_img, n_lab = len(arr[f"{split}_images"]), len(arr[f"{split}_labels"])
        if n_img != n_lab:
            raise DataError(f"{folder}: {split} has {n_img} images but {n_lab} labels")
    return Dataset(
        name,
        _images(arr["train_images"]),
        arr["train_labels"].astype(np.int32),
        _images(arr["test_images"]),
        arr["test_labels"].astype(np.int32),
        int(max(arr["train_labels"].max(), arr["test_labels"].max())) + 1,
    )


def _load_tfds(name: str, data_dir) -> Dataset:
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:  # pragma: no cover - depends on the extra
        raise ImportError("TFDS data sets need the extra: pip install 'flagjax[tfds]'") from err
    splits = {}
    for split in ("train", "test"):
        src = tfds.data_source(name, split=split, data_dir=data_dir)
        items = [src[i] for i in range(len(src))]
        x = np.stack([np.asarray(it["image"]) for it in items])
        y = np.asarray([int(it["label"]) for it in items], np.int32)
        splits[split] = (_images(x), y)
    num_classes = int(max(splits["train"][1].max(), splits["test"][1].max())) + 1
    return Dataset(f"tfds:{name}", *splits["train"], *splits["test"], num_classes)


def synthetic_dataset(n_train: int = 6000, n_test: int = 1000, seed: int = 0) -> Dataset:
    """A learnable stand-in with Fashion-MNIST's shapes: 10 fixed random 28x28 class prototypes plus
    pixel noise (sigma 0.3), clipped to [0, 1]. For smoke tests and ``--quick`` runs only."""
    rng = np.random.default_rng(seed)
    protos = rng.uniform(size=(10, 28, 28, 1)).astype(np.float32)

    def draw(n):
        y = rng.integers(0, 10, size=n).astype(np.int32)
        x = np.clip(protos[y] + 0.3 * rng.normal(size=(n, 28, 28, 1)), 0, 1).astype(np.float32)
        return x, y

    return Dataset("synthetic", *draw(n_train), *draw(n_test), 10)


SHARD_SCHEMES = ("iid", "dirichlet", "gamma")


def shard_indices(
    labels: np.ndarray,
    num_workers: int,
    *,
    scheme: str = "iid",
    alpha: float = 1.0,
    gamma: float = 1.0,
    seed: int = 0,
) -> list[np.ndarray]:
    """Split example indices among ``num_workers`` workers: a list of sorted int index arrays.

    * ``"iid"``: a random permutation cut into equal parts.
    * ``"dirichlet"``: for every class, proportions q ~ Dirichlet(alpha * 1) over workers; the class's
      examples are cut by q (Hsu et al. 2019). Small alpha = skewed label mixes. Every worker is
      guaranteed at least one example.
    * ``"gamma"``: gamma-similarity (ByzFL's ``gamma_similarity_niid``, after Karimireddy et al. 2022):
      a random fraction ``gamma`` of the examples is split iid, the rest is sorted by label and cut
      into contiguous parts (worker 0 gets the lowest labels), and worker k holds its part of both.
      gamma = 1 is iid, gamma = 0 ByzFL's ``extreme_niid``.
    """
    rng = np.random.default_rng(seed)
    n = len(labels)
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1; got {num_workers}")
    if scheme == "iid":
        return [np.sort(s) for s in np.array_split(rng.permutation(n), num_workers)]
    if scheme == "gamma":
        if not 0 <= gamma <= 1:
            raise ValueError(f"gamma must be in [0, 1]; got {gamma}")
        perm = rng.permutation(n)
        cut = int(n * gamma)
        rest = perm[cut:]
        rest = rest[np.lexsort((rest, np.asarray(labels)[rest]))]  # by label, then index (ByzFL's order)
        iid, niid = np.array_split(perm[:cut], num_workers), np.array_split(rest, num_workers)
        return [np.sort(np.concatenate([a, b])) for a, b in zip(iid, niid, strict=True)]
    if scheme != "dirichlet":
        raise ValueError(f"scheme must be one of {SHARD_SCHEMES}; got {scheme!r}")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0; got {alpha}")
    parts: list[list[np.ndarray]] = [[] for _ in range(num_workers)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        q = rng.dirichlet(np.full(num_workers, alpha))
        cuts = (np.cumsum(q)[:-1] * len(idx)).astype(int)
        for w, chunk in enumerate(np.split(idx, cuts)):
            parts[w].append(chunk)
    out = [np.sort(np.concatenate(p)) for p in parts]
    for w in range(num_workers):  # give empty workers one example from the largest shard
        if len(out[w]) == 0:
            big = int(np.argmax([len(o) for o in out]))
            out[w], out[big] = out[big][:1], out[big][1:]
    return out


class WorkerSampler:
    """Deterministic per-worker mini-batches: worker k walks its shard in epochs, each a permutation
    drawn from (seed, k, epoch); ``batch(step)`` depends only on the step, so a resumed run sees the
    same batches.
    """

    def __init__(self, shards: list[np.ndarray], batch_size: int, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        self.shards = shards
        self.batch_size = batch_size
        self.seed = seed
        self._perm_cache: dict[tuple[int, int], np.ndarray] = {}

    def _perm(self, k: int, epoch: int) -> np.ndarray:
        key = (k, epoch)
        if key not in self._perm_cache:
            if len(self._perm_cache) > 4 * len(self.shards):
                self._perm_cache.clear()
            rng = np.random.default_rng([self.seed, k, epoch])
            self._perm_cache[key] = self.shards[k][rng.permutation(len(self.shards[k]))]
        return self._perm_cache[key]

    def indices(self, step: int) -> np.ndarray:
        """(p, batch_size) example indices for ``step``."""
        out = np.empty((len(self.shards), self.batch_size), np.int64)
        for k, shard in enumerate(self.shards):
            n = len(shard)
            start = step * self.batch_size
            pos = np.arange(start, start + self.batch_size)
            epochs, offs = np.divmod(pos, n)
            for e in np.unique(epochs):
                sel = epochs == e
                out[k, sel] = self._perm(k, int(e))[offs[sel]]
        return out


LV_LEVELS = tuple(round(0.001 * i, 3) for i in range(1, 11))
_LV = (2 / 3, 4 / 3, 1.0, 1.0)  # alpha, beta, gamma, delta


def lotka_volterra_map(height: int, width: int, t: float, *, substeps: int = 50) -> np.ndarray:
    """Gather map (H*W,) int32 for the Lotka-Volterra flow of pixel coordinates at time ``t``.

    Pixel (row y, column x) is treated as the point (x, y) in pixel units with the LV field
    dx/dt = a x - b x y, dy/dt = d x y - c y (a, b, c, d = 2/3, 4/3, 1, 1; docs/design.md section 2). The
    output pixel at (x, y) takes the input pixel at the point that flows to (x, y) in time t (backward
    RK4 integration), rounded to the nearest pixel; points that leave the image read index H*W
    (callers pad with a zero pixel). The map depends only on coordinates, so one map per level is
    precomputed and applied to every image by a gather. On a 28 x 28 image the field's speed is ~300
    px per unit time at the centre and ~1000 at the far corner; the mean displacement of the pixels
    that stay inside grows from ~0.15 px at t = 0.001 to ~2.3 px at t = 0.010, while a growing share
    of the far corner flows out of the frame (tests/test_data.py measures both).
    """
    a, b, c, d = _LV
    ys, xs = np.meshgrid(np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64), indexing="ij")
    x, y = xs.ravel().copy(), ys.ravel().copy()

    def field(x, y):
        return a * x - b * x * y, d * x * y - c * y

    h = -t / substeps  # backward in time
    for _ in range(substeps):
        k1 = field(x, y)
        k2 = field(x + h / 2 * k1[0], y + h / 2 * k1[1])
        k3 = field(x + h / 2 * k2[0], y + h / 2 * k2[1])
        k4 = field(x + h * k3[0], y + h * k3[1])
        x = x + h / 6 * (k1[0] + 2 * k2[0] + 2 * k3[0] + k4[0])
        y = y + h / 6 * (k1[1] + 2 * k2[1] + 2 * k3[1] + k4[1])
    xi, yi = np.rint(x), np.rint(y)
    inside = (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height) & np.isfinite(xi) & np.isfinite(yi)
    idx = np.where(inside, yi * width + xi, height * width)
    return idx.astype(np.int32)
