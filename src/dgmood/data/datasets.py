"""Image sets named by a SPEC string (IDX datasets, synthetic OOD sets, custom files) as float32 (N, C, H, W)."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
import tempfile
import tokenize
import urllib.error
import urllib.request
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dgmood.data.collection import Collection, archive_kind, list_collection
from dgmood.data.errors import DataError
from dgmood.data.idx import read_idx, write_idx
from dgmood.data.images import DEFAULT_RESIZE, BadImage, ImagePolicy, fit_array, header
from dgmood.data.stream import DEFAULT_CHUNK, Chunk, stream_collection

__all__ = [
    "DATA_ENV",
    "DEFAULT_N",
    "DEFAULT_SHAPE",
    "DEFAULT_SPLITS",
    "ARRAY_SETS",
    "SPLITS",
    "SYNTHETIC",
    "URLS",
    "DataError",
    "Spec",
    "check_model_shape",
    "dataset_file",
    "describe",
    "download",
    "PHOTO_SETS",
    "common_shape",
    "fit_to_model",
    "to_model",
    "image_count",
    "iter_chunks",
    "open_collection",
    "survey_shapes",
    "head_spec",
    "image_sources",
    "load_images",
    "load_labels",
    "parse_spec",
    "prepare_images",
    "read_idx",
    "resolve_data_dir",
    "split_slice",
    "to_nchw",
    "to_unit",
    "write_idx",
]

DATA_ENV = "DGMOOD_DATA"
"""Environment variable naming the data directory."""

URLS: dict[str, str] = {
    "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
}
"""Official download location of each named dataset; a file's URL is base + file name."""

SPLITS = ("train", "test")
"""Splits of the named datasets; ``test`` is stored in the ``t10k-*`` files."""

DEFAULT_SPLITS: dict[str, tuple[str, ...]] = {"fashion-mnist": ("train",), "mnist": ("train", "test"),
                                              "cifar10": ("train",), "tiny-imagenet": ("val",),
                                              "cifar100": ("train",), "svhn": ("train",), "celeba": ("train",)}
"""Default split per dataset: the first listed whose image file exists (else the first)."""

PHOTO_SETS: dict[str, dict[str, tuple[tuple[str, str], ...]]] = {
    "cifar10": {"train": (("cifar10/cifar10-train.zip", ""),), "test": (("cifar10/cifar10-test.zip", ""),)},
    "tiny-imagenet": {"val": (("tiny-imagenet/tiny-imagenet-val.zip", ""),
                              ("tiny-imagenet/tiny-imagenet-200.zip", "tiny-imagenet-200/val/images/"))},
    "celeba": {split: (("celeba/img_align_celeba.zip", "img_align_celeba/"),)
               for split in ("train", "valid", "test")},
}
"""Named photograph sets: split → the archives that hold it, in order of preference, as (path in the data folder,
member prefix). CIFAR-10 is also read from the official binary release (:mod:`dgmood.data.releases`); CelebA's
one zip holds every split, each restricted to the images ``list_eval_partition.txt`` puts in it."""

ARRAY_SETS: dict[str, tuple[str, ...]] = {"cifar100": ("train", "test"), "svhn": ("train", "test", "extra")}
"""Named photograph sets read only from their official releases as arrays (:mod:`dgmood.data.releases`): name →
splits."""

SYNTHETIC = ("uniform", "gaussian", "constant")
"""Synthetic OOD sets (MSMA appendix A.1)."""

DEFAULT_N = 10000
"""Size of a synthetic set when no ``n`` is given."""

DEFAULT_SHAPE = (1, 28, 28)
"""(C, H, W) of a synthetic set when no ``shape`` is given."""

_STEMS = {"train": "train", "test": "t10k"}
# what np.load (allow_pickle=False) and reading an .npz member raise on a damaged file: numpy's header parser
# lets SyntaxError / tokenize.TokenError escape, zipfile raises RuntimeError (encrypted) and NotImplementedError
_NP_ERRORS = (ValueError, OSError, EOFError, MemoryError, RuntimeError, SyntaxError, tokenize.TokenError,
              zipfile.BadZipFile, zlib.error)
_SLICE_RE = re.compile(r"^(?P<base>.*)\[\s*(?P<start>[+-]?\d+)?\s*:\s*(?P<stop>[+-]?\d+)?\s*\]$")
_FORMS = (
    "use fashion-mnist[:train|:test], mnist[:train|:test], cifar10[:train|:test], cifar100[:train|:test], "
    "svhn[:train|:test|:extra], tiny-imagenet, celeba[:train|:valid|:test], uniform, gaussian, constant, "
    "or a path to a .npy file, a .npz file (x.npz:KEY), an IDX *-ubyte[.gz] file, a folder of images "
    "(read recursively) or a .zip/.tar/.tar.gz archive of images"
)


@dataclass(frozen=True)
class Spec:
    """A parsed dataset SPEC.

    Attributes:
        kind: ``named``, ``synthetic``, ``npy``, ``npz``, ``idx``, ``folder`` or ``archive``.
        name: dataset name (named/synthetic) or the path as written (custom kinds).
        split: split of a named dataset, its fixed default filled in (``fashion-mnist`` → ``train``);
            None when the default depends on the files present (``mnist``: train if it exists, else test).
        key: array name inside an ``.npz`` file; None means its only array.
        start: slice start (may be negative), None for the beginning.
        stop: slice stop (may be negative), None for the end.
    """

    kind: str
    name: str
    split: str | None = None
    key: str | None = None
    start: int | None = None
    stop: int | None = None

    def __str__(self) -> str:
        """The canonical display name, see :func:`describe`."""
        return describe(self)


# ----------------------------------------------------------------------------- locations


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The directory holding the named datasets (one sub-folder per dataset).

    Args:
        data_dir: explicit directory; wins when given.

    Returns:
        ``data_dir``, else ``$DGMOOD_DATA``, else ``$XDG_CACHE_HOME/dgmood/data``
        (``~/.cache/dgmood/data`` when XDG_CACHE_HOME is unset or relative). Not created.
    """
    if data_dir is not None and str(data_dir):
        return Path(data_dir).expanduser()
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser()
    from dgmood.utils.files import user_cache_dir

    return user_cache_dir("data")


def _file_name(split: str, what: str) -> str:
    """Official file name, e.g. ``t10k-images-idx3-ubyte.gz`` for (test, images)."""
    return f"{_STEMS[split]}-{what}-idx{3 if what == 'images' else 1}-ubyte.gz"


def dataset_file(name: str, split: str, what: str = "images", data_dir: str | os.PathLike | None = None) -> Path:
    """Where a named dataset's file lives (the gzipped name unless only the plain file exists).

    Args:
        name: ``fashion-mnist`` or ``mnist``.
        split: ``train`` or ``test``.
        what: ``images`` or ``labels``.
        data_dir: see :func:`resolve_data_dir`.

    Returns:
        The path, whether or not it exists.
    """
    gz = resolve_data_dir(data_dir) / _dataset_name(name) / _file_name(split, what)
    plain = gz.with_suffix("")
    return plain if plain.is_file() and not gz.is_file() else gz


def _dataset_name(name: str) -> str:
    """Canonical dataset name, or DataError listing the known ones."""
    key = name.strip().lower().replace("_", "-")
    if key in DEFAULT_SPLITS:
        return key
    raise DataError(f"unknown dataset '{name}'; the named datasets are {', '.join(DEFAULT_SPLITS)}")


# ----------------------------------------------------------------------------- SPEC grammar


def _int(text: str | None) -> int | None:
    """``int(text)``, None for None."""
    return None if text is None else int(text)


def split_slice(spec: str) -> tuple[str, int | None, int | None]:
    """(base, start, stop) of ``base[start:stop]``; a spec naming an existing path is kept whole."""
    m = _SLICE_RE.match(spec)
    if m and not Path(spec).expanduser().exists():
        start = _int(m["start"])
        return m["base"].strip(), (None if start == 0 else start), _int(m["stop"])
    if spec.endswith("]") and "[" in spec and not Path(spec).expanduser().exists():
        raise DataError(f"bad slice in '{spec}'; write [start:stop] with integers and no step, e.g. mnist[:8000]")
    return spec, None, None


def shared_images(a: str, b: str, data_dir: str | os.PathLike | None = None) -> bool:
    """Whether specs ``a`` and ``b`` can select the same images: one named dataset's split (resolved as loading
    would: ``mnist`` is its test split where no training file exists), overlapping slices. Slices with negative
    bounds count as overlapping (their ends depend on the set's size)."""
    sa, sb = parse_spec(a), parse_spec(b)
    if sa.kind != "named" or sb.kind != "named" or sa.name != sb.name:
        return False
    if _resolve_split(sa, data_dir) != _resolve_split(sb, data_dir):
        return False
    bounds = [(s.start or 0, math.inf if s.stop is None else s.stop) for s in (sa, sb)]
    if any(v < 0 for pair in bounds for v in pair):
        return True
    (a0, a1), (b0, b1) = bounds
    return max(a0, b0) < min(a1, b1)


def _path_kind(path: str) -> str | None:
    """Custom kind of a path from its extension (or being a folder), else None."""
    low = path.lower()
    if Path(path).expanduser().is_dir() or low.endswith(("/", os.sep)):
        return "folder"
    if archive_kind(low) is not None:
        return "archive"
    if low.endswith(".npy"):
        return "npy"
    if low.endswith(".npz"):
        return "npz"
    if low.endswith(("-ubyte", "-ubyte.gz", ".idx", ".idx.gz")):
        return "idx"
    return None


def _parse_named(base: str) -> Spec | None:
    """Spec for ``name[:split]`` of a named or synthetic set, None when the name is not one."""
    name, sep, split = base.partition(":")
    name = name.strip().lower().replace("_", "-")
    split = split.strip().lower()
    if name in SYNTHETIC:
        if sep:
            raise DataError(f"synthetic set '{base}' takes no split; write just {name} (optionally {name}[:N])")
        return Spec("synthetic", name)
    if name not in DEFAULT_SPLITS:
        return None
    splits = tuple(PHOTO_SETS[name]) if name in PHOTO_SETS else ARRAY_SETS.get(name, SPLITS)
    if sep and split not in splits:
        raise DataError(f"unknown split '{split}' for {name}; use {' or '.join(f'{name}:{p}' for p in splits)}")
    fixed = DEFAULT_SPLITS[name][0] if len(DEFAULT_SPLITS[name]) == 1 else None
    return Spec("named", name, split=split or fixed)


def _parse_path(base: str, spec: str) -> Spec:
    """Spec for a custom file or folder, or DataError for an unknown name."""
    kind = _path_kind(base)
    if kind is not None:
        return Spec(kind, base)
    if Path(base).expanduser().exists():
        raise DataError(f"cannot tell the format of {base}; {_FORMS}")
    head, sep, key = base.rpartition(":")
    if sep and head.lower().endswith(".npz") and key:
        return Spec("npz", head, key=key)
    raise DataError(f"unknown dataset '{spec}' (no such name, file or folder); {_FORMS}")


def parse_spec(spec: str | os.PathLike | Spec) -> Spec:
    """Parse a dataset SPEC string.

    Grammar: ``BASE[start:stop]`` where the optional python-style slice (no step) selects images and
    BASE is ``fashion-mnist[:train|:test]``, ``mnist[:train|:test]``, ``cifar10[:train|:test]``,
    ``cifar100[:train|:test]``, ``svhn[:train|:test|:extra]``, ``tiny-imagenet``, ``celeba[:train|:valid|:test]``,
    ``uniform``, ``gaussian``, ``constant``, or a path: ``x.npy``, ``x.npz`` / ``x.npz:KEY``, an IDX
    ``*-ubyte[.gz]`` file or a folder of PNG/JPEG images. Names win over paths (write ``./mnist`` for a folder
    called mnist); paths are recognised by existing on disk or by extension.

    Args:
        spec: the SPEC (a :class:`Spec` is returned unchanged).

    Returns:
        The parsed :class:`Spec`.

    Raises:
        DataError: empty spec, bad slice, unknown name/split or unrecognisable path.
    """
    if isinstance(spec, Spec):
        return spec
    text = os.fspath(spec).strip()
    if not text:
        raise DataError(f"empty dataset spec; {_FORMS}")
    base, start, stop = split_slice(text)
    parsed = _parse_named(base) or _parse_path(base, text)
    return Spec(parsed.kind, parsed.name, parsed.split, parsed.key, start, stop)


def describe(spec: str | os.PathLike | Spec) -> str:
    """Canonical display name of a SPEC, e.g. ``mnist[8000:]`` or ``fashion-mnist:test[:2000]``.

    Args:
        spec: the SPEC.

    Returns:
        Lower-case dataset names, a split only when it differs from a fixed default, the path as written.
    """
    s = parse_spec(spec)
    text = s.name
    if s.kind == "named" and s.split and DEFAULT_SPLITS[s.name] != (s.split,):
        text += f":{s.split}"
    if s.key is not None:
        text += f":{s.key}"
    if s.start is not None or s.stop is not None:
        text += f"[{'' if s.start is None else s.start}:{'' if s.stop is None else s.stop}]"
    return text


# ----------------------------------------------------------------------------- named datasets


def _resolve_split(s: Spec, data_dir: str | os.PathLike | None) -> str:
    """The explicit split, else the first default split whose image file exists."""
    if s.split:
        return s.split
    for split in DEFAULT_SPLITS[s.name]:
        if dataset_file(s.name, split, "images", data_dir).is_file():
            return split
    return DEFAULT_SPLITS[s.name][0]


def _named_path(s: Spec, what: str, data_dir: str | os.PathLike | None) -> Path:
    """Existing file of a named dataset, or DataError saying where to put which file."""
    split = _resolve_split(s, data_dir)
    path = dataset_file(s.name, split, what, data_dir)
    if not path.is_file():
        raise DataError(
            f"{s.name} {split} {what} not found: put {path.name} (from {URLS[s.name]}{path.name}) at {path}, "
            f"or run `dgmood data download {s.name}`"
        )
    return path


def download(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    force: bool = False,
    log: Callable[[str], None] | None = None,
) -> list[Path]:
    """Fetch a named dataset's missing files from its official location.

    FashionMNIST and MNIST: the IDX images and labels of every split (:data:`URLS`); CIFAR-10 and CIFAR-100: their
    binary releases; SVHN: ``train_32x32.mat`` and ``test_32x32.mat``; Tiny ImageNet: its zip
    (:mod:`dgmood.data.releases`). Each file is written to a temporary file in the same folder, checked (as IDX, as
    the release's format), then renamed. CelebA has no plain URL: its two files must be put there by hand.

    Args:
        name: ``fashion-mnist``, ``mnist``, ``cifar10``, ``cifar100``, ``svhn``, ``tiny-imagenet`` or ``celeba``.
        data_dir: see :func:`resolve_data_dir`; files go to ``data_dir/name/``.
        force: fetch even files that exist.
        log: called with one line per file fetched (e.g. ``click.echo``).

    Returns:
        The paths of all the dataset's files.

    Raises:
        DataError: unknown name, unwritable folder, network failure, a bad download, or CelebA's files missing.
    """
    name = _dataset_name(name)
    folder = resolve_data_dir(data_dir) / name
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        msg = f"cannot create {folder} ({e.strerror or e}); choose a writable data dir with ${DATA_ENV}"
        raise DataError(msg) from None
    if name in PHOTO_SETS or name in ARRAY_SETS:
        return _download_release(name, folder, force, log)
    paths = [folder / _file_name(split, what) for split in SPLITS for what in ("images", "labels")]
    for path in paths:
        if force or not (path.is_file() or path.with_suffix("").is_file()):
            _fetch(URLS[name] + path.name, path, log)
    return paths


def _download_release(name: str, folder: Path, force: bool, log: Callable[[str], None] | None) -> list[Path]:
    """The official release files of a photograph set in ``folder`` (fetched when missing or ``force``); CelebA's
    only when both are already there."""
    from dgmood.data import releases

    if name == "celeba":
        paths = [folder.parent / releases.CELEBA_ZIP, folder.parent / releases.CELEBA_PARTITION]
        if not all(p.is_file() for p in paths):
            raise DataError(releases.celeba_missing(folder.parent))
        return paths
    paths = []
    for url in releases.RELEASE_URLS[name]:
        path = folder / url.rsplit("/", 1)[1]
        if force or not path.is_file():
            _fetch(url, path, log, lambda p: releases.check_release(name, Path(p)), "release")
        paths.append(path)
    return paths


def _fetch(url: str, dest: Path, log: Callable[[str], None] | None, check: Callable[[str], object] = read_idx,
           what: str = "IDX file") -> None:
    """Download ``url`` to ``dest`` atomically, validating it with ``check`` (default: as IDX) before the rename."""
    if log is not None:
        log(f"downloading {url} -> {dest}")
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            shutil.copyfileobj(response, out, 1 << 20)
        check(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", None) or e
        msg = f"could not download {url} ({reason}); check the connection or put the file at {dest} by hand"
        raise DataError(msg) from None
    except DataError as e:
        msg = f"the download of {url} is not a valid {what} ({e}); try again or put the file at {dest} by hand"
        raise DataError(msg) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ----------------------------------------------------------------------------- custom files


def _np_load(path: Path) -> np.ndarray | np.lib.npyio.NpzFile:
    """``np.load`` without pickles, errors re-raised as DataError naming the file."""
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{path} does not exist; check the path") from None
    except _NP_ERRORS as e:
        msg = f"cannot read {path} ({e}); it is truncated, corrupt or not a numeric array, save it with numpy.save"
        raise DataError(msg) from None


def _load_npy(path: Path) -> np.ndarray:
    """The array of a ``.npy`` file."""
    obj = _np_load(path)
    if not isinstance(obj, np.ndarray):
        obj.close()
        raise DataError(f"{path} is an .npz archive, not an .npy array; rename it to .npz")
    return obj


def _load_npz(path: Path, key: str | None) -> np.ndarray:
    """Array ``key`` of an ``.npz`` file (its only array when key is None)."""
    obj = _np_load(path)
    if isinstance(obj, np.ndarray):
        raise DataError(f"{path} is an .npy array, not an .npz archive; rename it to .npy")
    with obj:
        keys = list(obj.files)
        if key is None and len(keys) != 1:
            hint = f"pick one with {path}:{keys[0]}" if keys else "save the images into it"
            raise DataError(f"{path} holds {len(keys)} arrays ({', '.join(keys) or 'none'}); {hint}")
        key = keys[0] if key is None else key
        if key not in keys:
            raise DataError(f"{path} has no array '{key}'; its arrays are {', '.join(keys)}, use {path}:NAME")
        try:
            arr = obj[key]
        except _NP_ERRORS as e:
            raise DataError(f"cannot read array '{key}' of {path} ({e}); the file is corrupt, save it again") from None
        if not isinstance(arr, np.ndarray):  # numpy returns a member that is not an .npy file as raw bytes
            raise DataError(f"'{key}' in {path} is not a numpy array; save the file with numpy.savez")
        return arr


def open_collection(spec: str | os.PathLike | Spec, data_dir: str | os.PathLike | None = None) -> Collection | None:
    """The :class:`~dgmood.data.collection.Collection` of a folder, an archive or a named photograph set stored
    as an archive; None for sets held as arrays (IDX, .npy, .npz, synthetic, CIFAR-10's binary release)."""
    s = parse_spec(spec)
    if s.kind in ("folder", "archive"):
        return list_collection(Path(s.name).expanduser())
    if s.kind == "named" and s.name in PHOTO_SETS:
        found = _photo_archive(s, data_dir)
        if found is None:
            return None
        collection = list_collection(*found)
        return _celeba_split(collection, s, data_dir) if s.name == "celeba" else collection
    return None


def _celeba_split(collection: Collection, s: Spec, data_dir: str | os.PathLike | None) -> Collection:
    """CelebA's zip restricted to the images ``list_eval_partition.txt`` puts in the spec's split (sorted order)."""
    from dgmood.data import releases

    split = _resolve_split(s, data_dir)
    names = releases.celeba_files(resolve_data_dir(data_dir), split)
    members = [m for m in collection.members if m in names]
    if not members:
        raise DataError(f"{collection.path} has none of the {len(names)} images list_eval_partition.txt puts in "
                        f"celeba:{split}; get both files from {releases.CELEBA_PAGE} again")
    return dataclasses.replace(collection, members=members)


def _photo_archive(s: Spec, data_dir: str | os.PathLike | None) -> tuple[Path, str] | None:
    """(archive, member prefix) of a named photograph set; None when only CIFAR-10's binary release is there."""
    from dgmood.data import releases

    split = _resolve_split(s, data_dir)
    root = resolve_data_dir(data_dir)
    for relative, prefix in PHOTO_SETS[s.name][split]:
        if (root / relative).is_file():
            return root / relative, prefix
    if s.name == "cifar10" and releases.cifar10_binary_path(root).is_file():
        return None
    if s.name == "celeba":
        raise DataError(releases.celeba_missing(root))
    first = root / PHOTO_SETS[s.name][split][0][0]
    raise DataError(f"{s.name} {split} not found: put {first.name} at {first}, "
                    f"or run `dgmood data download {s.name}`")


def image_sources(spec: str | os.PathLike | Spec, n_images: int, data_dir: str | os.PathLike | None = None
                  ) -> list[str]:
    """Where each of the first ``n_images`` images of ``spec`` came from: the relative path of a folder's file or
    an archive's member, else ``SPEC#INDEX`` (the index within the spec's array, after its slice)."""
    s = parse_spec(spec)
    collection = open_collection(s, data_dir)
    if collection is not None:
        start, stop = _bounds(len(collection.members), s)
        return collection.members[start:stop][:n_images]
    return [f"{spec}#{i}" for i in range(n_images)]


def image_count(spec: str | os.PathLike | Spec, collection: Collection) -> int:
    """Images of a folder or archive ``spec`` in its slice (``collection`` is its listing)."""
    start, stop = _bounds(len(collection.members), parse_spec(spec))
    return stop - start


def survey_shapes(spec: str | os.PathLike | Spec, data_dir: str | os.PathLike | None = None) -> Counter:
    """How many images of ``spec`` have each (C, H, W) (after EXIF orientation; C = 1 for grey modes), from
    headers only; unreadable images are not counted."""
    s = parse_spec(spec)
    if s.kind == "synthetic":
        return Counter({DEFAULT_SHAPE: len(_synthetic(s, DEFAULT_SHAPE, None, 0))})
    collection = open_collection(s, data_dir)
    if collection is None:
        x = to_nchw(_raw_images(s, data_dir), describe(s))
        start, stop = _bounds(len(x), s)
        return Counter({tuple(x.shape[1:]): stop - start})
    start, stop = _bounds(len(collection.members), s)
    counts = Counter()
    for source, data in collection.read(start, stop):
        if isinstance(data, BadImage):
            continue
        try:
            counts[header(data, source)] += 1
        except BadImage:
            continue
    return counts


def common_shape(spec: str | os.PathLike | Spec, data_dir: str | os.PathLike | None = None,
                 size: tuple[int, int] | None = None) -> tuple[int, int, int]:
    """The (C, H, W) a model trained on ``spec`` takes by default.

    Args:
        spec: the training set.
        data_dir: see :func:`resolve_data_dir`.
        size: (H, W) chosen by the user; None: the most common size (ties: the larger area).

    Returns:
        (C, H, W) with C = 3 when at least half of the images have colour, else 1.
    """
    counts = survey_shapes(spec, data_dir)
    if not counts:
        raise DataError(f"no image of {describe(spec)} can be read; check the files")
    colour = sum(n for (c, _, _), n in counts.items() if c == 3)
    channels = 3 if 2 * colour >= sum(counts.values()) else 1
    if size is None:
        sizes = Counter()
        for (_, h, w), n in counts.items():
            sizes[h, w] += n
        size = max(sizes, key=lambda hw: (sizes[hw], hw[0] * hw[1], hw))
    return channels, int(size[0]), int(size[1])


def _bad_image_error(s: Spec, err: BadImage) -> DataError:
    """One line naming a bad image by its path (a folder's file) or archive and member, and what to do."""
    where = str(Path(s.name) / err.source) if s.kind == "folder" else f"{describe(s)}: {err.source}"
    return DataError(f"{where}: {err.reason}; {err.fix}")


def _load_collection(collection: Collection, s: Spec, policy: ImagePolicy, n: int | None) -> np.ndarray:
    """(N, C, H, W) float32 of a collection's images in the spec's slice (the first ``n``), every image checked."""
    start, stop = _bounds(len(collection.members), s)
    stop = stop if n is None else min(stop, start + n)
    chunks = [c.images for c in stream_collection(collection, policy, start, stop)]
    return np.concatenate(chunks) if len(chunks) > 1 else chunks[0]


# ----------------------------------------------------------------------------- conversion


def _raw_images(s: Spec, data_dir: str | os.PathLike | None) -> np.ndarray:
    """The whole set before slicing, of a set held as an array: uint8 or float, (N, H, W) or (N, H, W, C)."""
    if s.kind == "named" and (s.name in PHOTO_SETS or s.name in ARRAY_SETS):
        from dgmood.data import releases

        return releases.read_release(s.name, resolve_data_dir(data_dir), _resolve_split(s, data_dir))[0]
    if s.kind == "named":
        return read_idx(_named_path(s, "images", data_dir))
    path = Path(s.name).expanduser()
    if s.kind == "npy":
        return _load_npy(path)
    if s.kind == "npz":
        return _load_npz(path, s.key)
    return read_idx(path)


def to_nchw(arr: np.ndarray, label: str) -> np.ndarray:
    """(N, C, H, W) view of an (N, H, W) or (N, H, W, C) array with C in {1, 3}."""
    if arr.dtype != np.uint8 and arr.dtype.kind != "f":
        raise DataError(f"{label} has dtype {arr.dtype}; save images as uint8 (0-255) or float in [0, 1]")
    if arr.ndim == 4 and arr.shape[1] in (1, 3) and arr.shape[3] not in (1, 3):
        raise DataError(
            f"{label} has shape {arr.shape}, channels first; save it as (N, H, W, C), e.g. x.transpose(0, 2, 3, 1)"
        )
    if arr.ndim not in (3, 4) or (arr.ndim == 4 and arr.shape[3] not in (1, 3)):
        raise DataError(
            f"{label} has shape {arr.shape}; expected (N, H, W) or (N, H, W, C) with C = 1 or 3, reshape it"
        )
    if arr.shape[0] == 0 or 0 in arr.shape[1:3]:
        raise DataError(f"{label} is empty (shape {arr.shape}); give a set with at least one image")
    return arr[:, None] if arr.ndim == 3 else arr.transpose(0, 3, 1, 2)


def _bounds(total: int, s: Spec) -> tuple[int, int]:
    """(start, stop) of the spec's slice in a set of ``total`` images; DataError when out of range or empty."""
    start = 0 if s.start is None else s.start + (total if s.start < 0 else 0)
    stop = total if s.stop is None else s.stop + (total if s.stop < 0 else 0)
    if not (0 <= start <= total and 0 <= stop <= total):
        text = f"[{'' if s.start is None else s.start}:{'' if s.stop is None else s.stop}]"
        raise DataError(
            f"slice {text} of {s.name} is out of range for {total} images; use bounds between -{total} and {total}"
        )
    if stop <= start:
        raise DataError(f"{describe(s)} selects no images ({total} available); widen the slice")
    return start, stop


def _check_count(n: int | None) -> int | None:
    """``n`` validated as None or a positive int."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1):
        raise DataError(f"n must be a positive integer, got {n!r}; pass e.g. n=10000")
    return None if n is None else int(n)


def _check_shape(shape: tuple[int, int, int] | None) -> tuple[int, int, int] | None:
    """``shape`` validated as None or three positive ints (C, H, W)."""
    if shape is None:
        return None
    dims = tuple(shape)
    if len(dims) != 3 or not all(isinstance(d, (int, np.integer)) and d > 0 for d in dims):
        raise DataError(f"shape must be (C, H, W) with positive ints, got {shape!r}; pass e.g. shape=(1, 28, 28)")
    return tuple(int(d) for d in dims)


def to_unit(x: np.ndarray, label: str) -> np.ndarray:
    """C-contiguous float32 in [0, 1]: uint8 divided by 255, float validated (finite, in range)."""
    if x.dtype == np.uint8:
        out = np.empty(x.shape, np.float32)
        return np.divide(x, np.float32(255.0), out=out, dtype=np.float32)
    if not np.isfinite(x).all():
        raise DataError(f"{label} contains NaN or inf values; remove or replace them")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise DataError(
            f"{label} has values in [{lo:.4g}, {hi:.4g}] but images must lie in [0, 1]; "
            "rescale them (or save uint8 0-255)"
        )
    return np.ascontiguousarray(x, dtype=np.float32)


def check_model_shape(x: np.ndarray, shape: tuple[int, int, int], label: str) -> None:
    """DataError when the images' (C, H, W) differs from the model's."""
    if tuple(x.shape[1:]) != shape:
        c, h, w = x.shape[1:]
        raise DataError(
            f"{label}: images are {h}x{w}x{c} but the model expects {shape[1]}x{shape[2]}x{shape[0]}; "
            "resize them or train a model on this data"
        )


def _synthetic(s: Spec, shape: tuple[int, int, int], n: int | None, seed: int) -> np.ndarray:
    """Seeded synthetic set; ``X[a:b]`` equals rows a..b of the unsliced set (prefix-stable generation)."""
    start, stop = _bounds(DEFAULT_N if n is None else n, s)
    rng = np.random.default_rng(seed)
    size = (stop, *shape)
    if s.name == "uniform":
        x = rng.random(size, dtype=np.float32)
    elif s.name == "gaussian":
        x = rng.standard_normal(size, dtype=np.float32)
        x += np.float32(0.5)
        np.clip(x, 0.0, 1.0, out=x)
    else:
        x = np.empty(size, np.float32)
        x[...] = rng.random(stop, dtype=np.float32).reshape(stop, 1, 1, 1)
    return np.ascontiguousarray(x[start:])


def head_spec(spec: str, n: int) -> str:
    """A spec for the first ``n`` images of ``spec`` (all of it when n ≤ 0), e.g. mnist[:8000], 5000 →
    mnist[0:5000]. Slices with negative bounds are kept whole."""
    parsed = parse_spec(spec)
    if n <= 0:
        return spec
    if parsed.start is None and parsed.stop is None:
        return f"{spec}[:{n}]"
    start = parsed.start or 0
    if start < 0 or (parsed.stop is not None and parsed.stop < 0):
        return spec
    stop = start + n if parsed.stop is None else min(parsed.stop, start + n)
    return f"{spec[: spec.rindex('[')]}[{start}:{stop}]"


def load_images(
    spec: str | os.PathLike | Spec,
    data_dir: str | os.PathLike | None = None,
    *,
    shape: tuple[int, int, int] | None = None,
    n: int | None = None,
    seed: int = 0,
    resize: str = DEFAULT_RESIZE,
) -> np.ndarray:
    """Load the image set a SPEC names (see :func:`parse_spec`), every image brought to one shape.

    Args:
        spec: dataset SPEC, e.g. ``fashion-mnist``, ``mnist[8000:]``, ``uniform[:500]``, ``x.npz:test``,
            ``photos/``, ``cifar10:test``, ``x.tar.gz[:100]``.
        data_dir: folder of the named datasets, see :func:`resolve_data_dir`.
        shape: the model's (C, H, W): every image is brought to it by the ``resize`` policy
            (:mod:`dgmood.data.images`); synthetic sets are drawn at it. None: arrays keep their shape, a folder
            or archive takes its most common one (:func:`common_shape`), synthetic sets are (1, 28, 28).
        n: synthetic sets: size before slicing (default 10000); other sets: keep at most the first n
            images after slicing.
        seed: seed of synthetic sets (``numpy.random.default_rng``); the same spec and seed give the same images.
        resize: ``crop``, ``stretch``, ``pad`` or ``error`` (see :mod:`dgmood.data.images`).

    Returns:
        C-contiguous float32 array of shape (N, C, H, W) with values in [0, 1].

    Raises:
        DataError: any bad spec, missing/corrupt file or bad values; the one-line message names the fix.
    """
    s, shape, n = parse_spec(spec), _check_shape(shape), _check_count(n)
    if s.kind == "synthetic":
        return _synthetic(s, shape or DEFAULT_SHAPE, n, seed)
    label = describe(s)
    collection = open_collection(s, data_dir)
    if collection is not None:
        policy = ImagePolicy(shape or common_shape(s, data_dir), resize)
        try:
            return _load_collection(collection, s, policy, n)
        except BadImage as err:
            raise _bad_image_error(s, err) from None
    x = to_nchw(_raw_images(s, data_dir), label)
    start, stop = _bounds(len(x), s)
    return to_unit(x[start:stop][:n], label) if shape is None else to_model(x[start:stop][:n], shape, label, resize)


def to_model(x: np.ndarray, shape: tuple[int, int, int], label: str, resize: str = DEFAULT_RESIZE) -> np.ndarray:
    """(N, C, H, W) images, uint8 or float in [0, 1] (validated), as C-contiguous float32 in [0, 1] of the model's
    (C, H, W): uint8 images of another size take the steps of a decoded file (:func:`fit_to_model`)."""
    if resize == "error" and tuple(x.shape[2:]) != tuple(shape[1:]):  # colour is converted under every policy
        check_model_shape(x, tuple(shape), label)
    if x.dtype == np.uint8 and tuple(x.shape[1:]) != tuple(shape):
        return fit_to_model(np.ascontiguousarray(x), shape, label, resize)
    return fit_to_model(to_unit(x, label), shape, label, resize)


def fit_to_model(x: np.ndarray, shape: tuple[int, int, int], label: str, resize: str = DEFAULT_RESIZE) -> np.ndarray:
    """(N, C, H, W) images (uint8, or float32 in [0, 1]) as float32 in [0, 1] brought to the model's (C, H, W) by
    the ``resize`` policy (:func:`dgmood.data.images.fit_array`); DataError when ``resize`` is ``error`` and the
    size differs."""
    try:
        return fit_array(x, ImagePolicy(tuple(shape), resize), label)
    except BadImage:
        check_model_shape(x, tuple(shape), label)
        raise


def iter_chunks(
    spec: str | os.PathLike | Spec,
    shape: tuple[int, int, int],
    data_dir: str | os.PathLike | None = None,
    *,
    resize: str = DEFAULT_RESIZE,
    chunk: int = DEFAULT_CHUNK,
    skip_bad: bool = False,
    seed: int = 0,
) -> Iterator[Chunk]:
    """The images of ``spec`` in chunks of at most ``chunk``, brought to ``shape`` by ``resize``: memory bounded
    by a chunk for folders and archives (decoded ahead by threads, :mod:`dgmood.data.stream`).

    Raises:
        DataError: a bad spec or set, or (unless ``skip_bad``) the first image that cannot be used, named.
    """
    s = parse_spec(spec)
    collection = open_collection(s, data_dir)
    if collection is not None:
        start, stop = _bounds(len(collection.members), s)
        try:
            yield from stream_collection(collection, ImagePolicy(tuple(shape), resize), start, stop, chunk, skip_bad)
        except BadImage as err:
            raise _bad_image_error(s, err) from None
        return
    label = describe(s)
    if s.kind == "synthetic":
        x, size = load_images(s, data_dir, shape=shape, seed=seed), tuple(shape[1:])
    else:
        raw = to_nchw(_raw_images(s, data_dir), label)
        start, stop = _bounds(len(raw), s)
        x, size = raw[start:stop], raw.shape[2:]
    for begin in range(0, len(x), chunk):
        images = to_model(x[begin:begin + chunk], shape, label, resize)
        yield Chunk(images, [f"{spec}#{i}" for i in range(begin, begin + len(images))],
                    np.tile(np.asarray(size, np.int64), (len(images), 1)),
                    np.arange(begin, begin + len(images), dtype=np.int64), [])


def load_labels(spec: str | os.PathLike | Spec, data_dir: str | os.PathLike | None = None) -> np.ndarray:
    """Class labels of a named dataset, with the same split and slice rules as :func:`load_images`.

    CIFAR-10's labels are its class folders in sorted order (airplane 0 … truck 9, as the official release numbers
    them) or the binary release's label bytes; CIFAR-100's its fine labels (0–99); SVHN's its digits (0–9, the
    files' 10 being 0); Tiny ImageNet's validation images and CelebA have none here.

    Args:
        spec: SPEC of a named dataset, e.g. ``mnist[:8000]``.
        data_dir: see :func:`resolve_data_dir`.

    Returns:
        int64 array of shape (N,).

    Raises:
        DataError: not a named dataset, missing or corrupt labels file, bad slice.
    """
    s = parse_spec(spec)
    if s.kind != "named" or s.name in ("tiny-imagenet", "celeba"):
        raise DataError(f"{describe(s)} has no labels; labels exist only for {', '.join(URLS)}, cifar10, cifar100, "
                        "svhn")
    if s.name in ARRAY_SETS:
        from dgmood.data import releases

        labels = releases.read_release(s.name, resolve_data_dir(data_dir), _resolve_split(s, data_dir))[1]
    else:
        labels = _photo_labels(s, data_dir) if s.name in PHOTO_SETS else read_idx(_named_path(s, "labels", data_dir))
    if labels.ndim != 1:
        raise DataError(f"{s.name} labels have shape {labels.shape}, expected (N,); the file is corrupt, get it again")
    start, stop = _bounds(len(labels), s)
    return labels[start:stop].astype(np.int64)


def _photo_labels(s: Spec, data_dir: str | os.PathLike | None) -> np.ndarray:
    """CIFAR-10's labels, (N,): the class folder of each archive member (sorted classes), or the binary release's."""
    collection = open_collection(Spec(s.kind, s.name, s.split), data_dir)
    if collection is None:
        from dgmood.data import releases

        return releases.read_cifar10_binary(releases.cifar10_binary_path(resolve_data_dir(data_dir)),
                                            _resolve_split(s, data_dir))[1]
    classes = [m.split("/")[-2] for m in collection.members]
    index = {c: i for i, c in enumerate(sorted(set(classes)))}
    return np.array([index[c] for c in classes], np.int64)


def prepare_images(images, shape: tuple[int, int, int], label: str = "input", resize: str = "error") -> np.ndarray:
    """Validate images for a model of (C, H, W) ``shape`` and convert them to float32 (N, C, H, W) in [0, 1].

    Args:
        images: array-like or CPU tensor of shape (N, H, W), (N, H, W, C) or (N, C, H, W) with C in
            {1, 3}; uint8 (0-255) or float in [0, 1].
        shape: the model's (C, H, W).
        label: what the images are called in error messages.
        resize: how images of another size or colour are brought to ``shape`` (:mod:`dgmood.data.images`);
            ``error`` refuses another size.

    Returns:
        C-contiguous float32 array of shape (N, C, H, W).

    Raises:
        DataError: the rules and messages of :func:`dgmood.data.datasets.load_images` (dtype, shape, channels,
            size, NaN/inf, range, empty).
    """
    if hasattr(images, "detach") and hasattr(images, "numpy"):  # a torch tensor (torch is not imported here)
        images = images.detach().cpu().numpy()
    try:
        arr = np.asarray(images)
    except (ValueError, TypeError) as err:
        raise DataError(f"{label} cannot be read as an array ({err}); pass a numpy array (N, H, W[, C])") from None
    if arr.ndim == 4 and arr.shape[1] in (1, 3) and arr.shape[3] not in (1, 3):
        arr = arr.transpose(0, 2, 3, 1)  # (N, C, H, W) is accepted here (dgmood.data.datasets asks files for channels last)
    x = to_nchw(arr, label)
    return to_model(x, shape, label, resize)
