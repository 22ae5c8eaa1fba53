"""Official releases of the photograph sets, as their authors publish them: CIFAR-10's and CIFAR-100's *binary*
versions (raw bytes, never the pickled Python versions), SVHN's cropped digits (MATLAB v5 .mat, read by
:mod:`dgmood.data.matfile`), Tiny ImageNet's zip and CelebA's aligned faces, with their download locations and
checks.

CIFAR-10 binary format (https://www.cs.toronto.edu/~kriz/cifar.html): ``cifar-10-batches-bin/`` in a .tar.gz
holds ``data_batch_1.bin`` … ``data_batch_5.bin`` (training, 10,000 images each) and ``test_batch.bin``; each
image is one 3,073-byte record: its label (0–9), then 1,024 red, 1,024 green and 1,024 blue bytes, rows first.
CIFAR-100's ``cifar-100-binary/`` holds ``train.bin`` (50,000) and ``test.bin`` (10,000) of 3,074-byte records:
a coarse label (0–19), a fine label (0–99), then the image as in CIFAR-10.

SVHN (http://ufldl.stanford.edu/housenumbers/): ``train_32x32.mat`` (73,257 digits), ``test_32x32.mat`` (26,032)
and ``extra_32x32.mat`` (531,131), each with ``X`` (32, 32, 3, N) uint8 and ``y`` (N, 1) in 1..10, 10 being the
digit 0.

CelebA (https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html, hosted on Google Drive): ``img_align_celeba.zip``
(``img_align_celeba/`` of 202,599 JPEGs, 178×218) and ``list_eval_partition.txt`` (lines ``000001.jpg 0``:
0 train, 1 valid, 2 test).
"""

from __future__ import annotations

import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np

from dgmood.data.errors import DataError

__all__ = ["CELEBA_PAGE", "CELEBA_PARTITION", "CELEBA_SPLITS", "CELEBA_ZIP", "CIFAR100_BINARY", "CIFAR100_URL",
           "CIFAR10_BINARY", "CIFAR10_URL", "RECORD_BYTES", "RELEASE_URLS", "SVHN_FILES", "SVHN_URL",
           "TINY_IMAGENET_URL", "celeba_files", "celeba_missing", "check_release", "cifar10_binary_path",
           "read_cifar100_binary", "read_cifar10_binary", "read_release", "read_svhn", "release_path",
           "write_cifar100_binary", "write_cifar10_binary"]

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
"""The official binary release of CIFAR-10."""

TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
"""The official Tiny ImageNet release (its validation images are the near-OOD set)."""

CIFAR10_BINARY = "cifar10/cifar-10-binary.tar.gz"
"""Where the binary release lives in the data folder."""

CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz"
"""The official binary release of CIFAR-100."""

CIFAR100_BINARY = "cifar100/cifar-100-binary.tar.gz"
"""Where CIFAR-100's binary release lives in the data folder."""

SVHN_URL = "http://ufldl.stanford.edu/housenumbers/"
"""The official location of SVHN's cropped digits; a file's URL is this + its name."""

SVHN_FILES = {"train": "svhn/train_32x32.mat", "test": "svhn/test_32x32.mat", "extra": "svhn/extra_32x32.mat"}
"""Where each SVHN split lives in the data folder (``extra`` is 1.3 GB and is not downloaded)."""

CELEBA_PAGE = "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html"
"""CelebA's official page (its files are on Google Drive, which has no plain download URL)."""

CELEBA_ZIP = "celeba/img_align_celeba.zip"
"""Where CelebA's aligned images live in the data folder."""

CELEBA_PARTITION = "celeba/list_eval_partition.txt"
"""Where CelebA's official split list lives in the data folder."""

CELEBA_SPLITS = {"train": "0", "valid": "1", "test": "2"}
"""CelebA's splits and their numbers in ``list_eval_partition.txt``."""

RELEASE_URLS: dict[str, tuple[str, ...]] = {
    "cifar10": (CIFAR10_URL,), "tiny-imagenet": (TINY_IMAGENET_URL,), "cifar100": (CIFAR100_URL,),
    "svhn": (SVHN_URL + "train_32x32.mat", SVHN_URL + "test_32x32.mat"), "celeba": ()}
"""The files ``dgmood data download NAME`` fetches (into ``DATA/NAME/``, named as in the URL)."""

RECORD_BYTES = 1 + 3 * 32 * 32
"""One CIFAR-10 binary record: a label byte and a 32×32 RGB image, channels first."""

_BATCHES = {"train": [f"cifar-10-batches-bin/data_batch_{i}.bin" for i in range(1, 6)],
            "test": ["cifar-10-batches-bin/test_batch.bin"]}
_BATCHES_100 = {"train": ["cifar-100-binary/train.bin"], "test": ["cifar-100-binary/test.bin"]}


def cifar10_binary_path(data_dir: Path) -> Path:
    """The binary release's path in the data folder ``data_dir`` (whether or not it exists)."""
    return Path(data_dir) / CIFAR10_BINARY


def _records(raw: bytes, name: str, labels: int = 1, label: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 32, 32, 3) uint8, labels (N,) int64) of one batch file's bytes: records of ``labels`` label
    bytes (the one kept is byte ``label``) and an image."""
    size = labels + 3 * 32 * 32
    if len(raw) == 0 or len(raw) % size:
        raise DataError(f"{name} has {len(raw)} bytes, not a whole number of {size}-byte CIFAR records; "
                        "the download is truncated or corrupt, fetch it again")
    rows = np.frombuffer(raw, np.uint8).reshape(-1, size)
    images = rows[:, labels:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), rows[:, label].astype(np.int64)


def read_cifar10_binary(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of a split of CIFAR-10's binary release.

    Args:
        path: ``cifar-10-binary.tar.gz``.
        split: ``train`` (50,000 images) or ``test`` (10,000).

    Returns:
        (images (N, 32, 32, 3) uint8, labels (N,) int64 in 0..9), in the release's order.

    Raises:
        DataError: a missing, truncated or corrupt file, or a batch missing from it.
    """
    return _read_batches(path, _BATCHES[split], "CIFAR-10", 1)


def read_cifar100_binary(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images and fine labels of a split of CIFAR-100's binary release.

    Args:
        path: ``cifar-100-binary.tar.gz``.
        split: ``train`` (50,000 images) or ``test`` (10,000).

    Returns:
        (images (N, 32, 32, 3) uint8, fine labels (N,) int64 in 0..99), in the release's order.

    Raises:
        DataError: a missing, truncated or corrupt file, or a batch missing from it.
    """
    return _read_batches(path, _BATCHES_100[split], "CIFAR-100", 2)


def _read_batches(path: Path, names: list[str], what: str, labels: int) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 32, 32, 3) uint8, labels (N,) int64) of the batch files ``names`` of a CIFAR binary release whose
    records start with ``labels`` label bytes (the last one is kept: CIFAR-100's fine label)."""
    parts = []
    try:
        with tarfile.open(path, "r:*") as tf:
            for name in names:
                try:
                    member = tf.extractfile(name)
                except KeyError:
                    member = None
                if member is None:
                    raise DataError(f"{path} has no {name}; it is not {what}'s binary release, download it again")
                parts.append(_records(member.read(), name, labels, labels - 1))
    except (OSError, EOFError, tarfile.TarError, zlib.error) as err:
        raise DataError(f"cannot read {path} ({err}); it is truncated or corrupt, download it again") from None
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def write_cifar10_binary(path: Path, images: dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> Path:
    """Write a release in CIFAR-10's binary format (tests make small ones); ``images[split]`` is (N, 32, 32, 3)
    uint8, split into the release's batch files (training images spread over five)."""
    return _write_batches(path, _BATCHES, images, {k: np.asarray(v)[:, None] for k, v in labels.items()})


def write_cifar100_binary(path: Path, images: dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> Path:
    """Write a release in CIFAR-100's binary format (tests make small ones); ``images[split]`` is (N, 32, 32, 3)
    uint8, ``labels[split]`` the fine labels (N,) (the coarse label byte is written as fine // 5)."""
    fine = {k: np.asarray(v) for k, v in labels.items()}
    return _write_batches(path, _BATCHES_100, images, {k: np.stack([v // 5, v], axis=1) for k, v in fine.items()})


def _write_batches(path: Path, batches: dict[str, list[str]], images: dict[str, np.ndarray],
                   labels: dict[str, np.ndarray]) -> Path:
    """A .tar.gz of CIFAR binary batch files: per split, records of the label bytes (N, L) and the image."""
    import io

    with tarfile.open(path, "w:gz") as tf:
        for split, names in batches.items():
            x, y = np.asarray(images[split], np.uint8), np.asarray(labels[split], np.uint8)
            records = np.concatenate([y, x.transpose(0, 3, 1, 2).reshape(len(x), -1)], axis=1)
            for name, part in zip(names, np.array_split(records, len(names))):
                data = part.tobytes()
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


def read_svhn(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of one of SVHN's cropped-digits files.

    Args:
        path: ``train_32x32.mat``, ``test_32x32.mat`` or ``extra_32x32.mat`` (MATLAB v5, compressed or not).

    Returns:
        (images (N, 32, 32, 3) uint8, labels (N,) int64 in 0..9: the file's 10 is the digit 0).

    Raises:
        DataError: a missing, truncated or corrupt file, or one without SVHN's ``X`` and ``y``.
    """
    from dgmood.data.matfile import read_mat

    found = read_mat(path, ("X", "y"))
    x, y = found.get("X"), found.get("y")
    if x is None or y is None or x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.dtype != np.uint8 \
            or y.size != x.shape[3]:
        raise DataError(f"{path} has no X (32, 32, 3, N) uint8 and y (N, 1); it is not SVHN's cropped digits "
                        f"({SVHN_URL}), download it again")
    labels = y.reshape(-1).astype(np.int64)
    if labels.size and (labels.min() < 1 or labels.max() > 10):
        raise DataError(f"{path} has labels outside 1..10; it is not SVHN's cropped digits, download it again")
    return np.ascontiguousarray(x.transpose(3, 0, 1, 2)), labels % 10


def release_path(name: str, data_dir: Path, split: str) -> Path:
    """Where the release file of a split of ``cifar10``, ``cifar100`` or ``svhn`` lives (whether or not it
    exists)."""
    relative = {"cifar10": CIFAR10_BINARY, "cifar100": CIFAR100_BINARY}.get(name) or SVHN_FILES[split]
    return Path(data_dir) / relative


def read_release(name: str, data_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 32, 32, 3) uint8, labels (N,) int64) of a split of the release of ``cifar10``, ``cifar100`` or
    ``svhn`` in the data folder ``data_dir``; DataError saying where to put it when it is missing."""
    path = release_path(name, data_dir, split)
    if not path.is_file():
        url = SVHN_URL + path.name if name == "svhn" else RELEASE_URLS[name][0]
        fetch = "" if name == "svhn" and split == "extra" else f", or run `dgmood data download {name}`"
        raise DataError(f"{name} {split} not found: put {path.name} (from {url}) at {path}{fetch}")
    if name == "svhn":
        return read_svhn(path)
    return (read_cifar10_binary if name == "cifar10" else read_cifar100_binary)(path, split)


def celeba_missing(data_dir: Path) -> str:
    """The one-line message of a missing CelebA: where to get its two files and where to put them."""
    root = Path(data_dir)
    return (f"CelebA has no plain download URL (its files are on Google Drive): get img_align_celeba.zip and "
            f"list_eval_partition.txt from {CELEBA_PAGE} and put them at {root / CELEBA_ZIP} and "
            f"{root / CELEBA_PARTITION}")


def celeba_files(data_dir: Path, split: str) -> set[str]:
    """The image names (``000001.jpg``) of a CelebA split (``train``, ``valid``, ``test``), from the data folder's
    ``list_eval_partition.txt``; DataError when it is missing or not in the official format."""
    path = Path(data_dir) / CELEBA_PARTITION
    try:
        text = path.read_text("ascii")
    except FileNotFoundError:
        raise DataError(celeba_missing(data_dir)) from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read {path} ({err}); get list_eval_partition.txt from {CELEBA_PAGE} again") from None
    wanted, names = CELEBA_SPLITS[split], set()
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise DataError(f"line {number} of {path} is not 'NAME.jpg 0|1|2'; get list_eval_partition.txt "
                            f"from {CELEBA_PAGE} again")
        if fields[1] == wanted:
            names.add(fields[0])
    return names


def check_release(name: str, path: Path) -> None:
    """DataError unless ``path`` is a readable release file of ``name`` (``cifar10``, ``cifar100``, ``svhn`` or
    ``tiny-imagenet``)."""
    if name in ("cifar10", "cifar100"):
        (read_cifar10_binary if name == "cifar10" else read_cifar100_binary)(path, "test")
        return
    if name == "svhn":
        read_svhn(path)
        return
    try:
        with zipfile.ZipFile(path) as zf:
            if not any(n.startswith("tiny-imagenet-200/val/images/") for n in zf.namelist()):
                raise DataError(f"{path} has no tiny-imagenet-200/val/images/; it is not the Tiny ImageNet release")
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise DataError(f"cannot read {path} ({err}); it is truncated or corrupt") from None
