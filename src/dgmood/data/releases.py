"""Official releases of the photograph sets, as their authors publish them: CIFAR-10's *binary* version (raw
bytes, never the pickled Python version) and Tiny ImageNet's zip, with their download locations and checks.

CIFAR-10 binary format (https://www.cs.toronto.edu/~kriz/cifar.html): ``cifar-10-batches-bin/`` in a .tar.gz
holds ``data_batch_1.bin`` … ``data_batch_5.bin`` (training, 10,000 images each) and ``test_batch.bin``; each
image is one 3,073-byte record: its label (0–9), then 1,024 red, 1,024 green and 1,024 blue bytes, rows first.
"""

from __future__ import annotations

import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np

__all__ = ["CIFAR10_BINARY", "CIFAR10_URL", "RECORD_BYTES", "TINY_IMAGENET_URL", "cifar10_binary_path",
           "check_release", "read_cifar10_binary", "write_cifar10_binary"]

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
"""The official binary release of CIFAR-10."""

TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
"""The official Tiny ImageNet release (its validation images are the near-OOD set)."""

CIFAR10_BINARY = "cifar10/cifar-10-binary.tar.gz"
"""Where the binary release lives in the data folder."""

RECORD_BYTES = 1 + 3 * 32 * 32
"""One CIFAR-10 binary record: a label byte and a 32×32 RGB image, channels first."""

_BATCHES = {"train": [f"cifar-10-batches-bin/data_batch_{i}.bin" for i in range(1, 6)],
            "test": ["cifar-10-batches-bin/test_batch.bin"]}


def cifar10_binary_path(data_dir: Path) -> Path:
    """The binary release's path in the data folder ``data_dir`` (whether or not it exists)."""
    return Path(data_dir) / CIFAR10_BINARY


def _records(raw: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 32, 32, 3) uint8, labels (N,) int64) of one batch file's bytes."""
    from dgmood.data.datasets import DataError

    if len(raw) == 0 or len(raw) % RECORD_BYTES:
        raise DataError(f"{name} has {len(raw)} bytes, not a whole number of {RECORD_BYTES}-byte CIFAR-10 records; "
                        "the download is truncated or corrupt, fetch it again")
    rows = np.frombuffer(raw, np.uint8).reshape(-1, RECORD_BYTES)
    images = rows[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), rows[:, 0].astype(np.int64)


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
    from dgmood.data.datasets import DataError

    parts = []
    try:
        with tarfile.open(path, "r:*") as tf:
            for name in _BATCHES[split]:
                try:
                    member = tf.extractfile(name)
                except KeyError:
                    member = None
                if member is None:
                    raise DataError(f"{path} has no {name}; it is not CIFAR-10's binary release, download it again")
                parts.append(_records(member.read(), name))
    except (OSError, EOFError, tarfile.TarError, zlib.error) as err:
        raise DataError(f"cannot read {path} ({err}); it is truncated or corrupt, download it again") from None
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def write_cifar10_binary(path: Path, images: dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> Path:
    """Write a release in CIFAR-10's binary format (tests make small ones); ``images[split]`` is (N, 32, 32, 3)
    uint8, split into the release's batch files (training images spread over five)."""
    import io

    with tarfile.open(path, "w:gz") as tf:
        for split, names in _BATCHES.items():
            x, y = np.asarray(images[split], np.uint8), np.asarray(labels[split], np.uint8)
            records = np.concatenate([y[:, None], x.transpose(0, 3, 1, 2).reshape(len(x), -1)], axis=1)
            for name, part in zip(names, np.array_split(records, len(names))):
                data = part.tobytes()
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


def check_release(name: str, path: Path) -> None:
    """DataError unless ``path`` is a readable release of ``name`` (``cifar10`` or ``tiny-imagenet``)."""
    from dgmood.data.datasets import DataError

    if name == "cifar10":
        read_cifar10_binary(path, "test")
        return
    try:
        with zipfile.ZipFile(path) as zf:
            if not any(n.startswith("tiny-imagenet-200/val/images/") for n in zf.namelist()):
                raise DataError(f"{path} has no tiny-imagenet-200/val/images/; it is not the Tiny ImageNet release")
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise DataError(f"cannot read {path} ({err}); it is truncated or corrupt") from None
