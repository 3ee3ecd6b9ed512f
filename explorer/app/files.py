"""Which files the app may read and write: only those under its data directory.

The browser names datasets and export files by paths relative to ``data_dir``; every
name goes through :func:`resolve_under`, which rejects absolute paths, ``..`` and links
that lead outside the folder, so a page can never make the server open another file.

Exports never destroy: :func:`export_target` checks a name before any work, and
:func:`write_new` puts the written file in place in one step, refusing to replace an
existing file (:class:`ExistingFileError`) unless asked to.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from explorer._types import InputError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

#: file endings the app offers as datasets (what ``explorer.data.io.read`` understands;
#: ``.zarr`` is a folder, AnnData's chunked store, opened lazily)
DATASET_SUFFIXES: tuple[str, ...] = (".h5ad", ".loom", ".zarr")


def is_dataset(path: Path) -> bool:
    """Whether ``path`` is a dataset the app opens: an ``.h5ad``/``.loom`` file or a ``.zarr`` folder."""
    suffix = path.suffix.lower()
    if suffix == ".zarr":
        return path.is_dir()
    return suffix in DATASET_SUFFIXES and path.is_file()

#: how deep :func:`list_datasets` looks below ``data_dir`` (a folder of folders is common)
_MAX_DEPTH = 2


def resolve_under(data_dir: str | Path, name: str) -> Path:
    """Resolve ``name`` inside ``data_dir``, refusing anything that leaves it.

    Parameters
    ----------
    data_dir
        The only folder the app may read from or write to.
    name
        A relative path such as ``"pancreas.h5ad"`` or ``"runs/out.h5ad"``.

    Returns
    -------
    The resolved absolute path (links followed), which lies inside ``data_dir``.

    Raises
    ------
    InputError
        If ``name`` is empty, absolute, contains ``..``, or resolves (through a link)
        outside ``data_dir``.
    """
    root = Path(data_dir).resolve()
    text = str(name).strip()
    if not text:
        msg = f"Expected a file name under the data directory {root}; found an empty name."
        raise InputError(msg)
    parts = PurePosixPath(text.replace("\\", "/"))
    if parts.is_absolute() or Path(text).is_absolute() or text.startswith("~"):
        msg = (
            f"Expected a path relative to the data directory {root}; found the absolute path {text!r}. "
            "Give the file's name inside the data directory "
            "(start `explorer serve` with --data-dir to change it)."
        )
        raise InputError(msg)
    if ".." in parts.parts:
        msg = f"Expected a path inside the data directory {root}; {text!r} contains '..'. Name a file in it."
        raise InputError(msg)
    path = (root / parts).resolve()
    if not path.is_relative_to(root):
        msg = (
            f"Expected a file inside the data directory {root}; {text!r} is a link to {path}, "
            "which is outside it. "
            "Copy the file into the data directory instead."
        )
        raise InputError(msg)
    return path


def list_datasets(data_dir: str | Path) -> list[str]:
    """Datasets (``.h5ad``, ``.loom`` files, ``.zarr`` folders) under ``data_dir``, as sorted relative names.

    Looks at most two folders deep, skips hidden entries, and leaves out links that lead
    outside ``data_dir``.
    """
    root = Path(data_dir).resolve()
    if not root.is_dir():
        return []
    found: list[str] = []

    def walk(folder: Path, depth: int) -> None:
        try:
            entries = sorted(folder.iterdir())
        except OSError:
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                target = entry.resolve()
            except OSError:
                continue
            if not target.is_relative_to(root):
                continue
            if is_dataset(entry):
                found.append(entry.relative_to(root).as_posix())
            elif target.is_dir() and depth < _MAX_DEPTH:
                walk(entry, depth + 1)

    walk(root, 0)
    return found


#: the longest file name (bytes) where the file system does not say (Linux, macOS, Windows)
_NAME_MAX = 255


class ExistingFileError(InputError):
    """An export would replace the existing file ``path``; it is written only when the user confirms.

    Raised by :func:`export_target` and :func:`write_new` with ``overwrite=False``.
    """

    def __init__(self, message: str, path: Path) -> None:
        super().__init__(message)
        self.path = path


def _name_max(folder: Path) -> int:
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):  # no such folder, or no pathconf (Windows)
        return _NAME_MAX


def export_target(
    data_dir: str | Path,
    name: str,
    *,
    suffixes: tuple[str, ...] = (".h5ad",),
    protect: Iterable[str | Path | None] = (),
    overwrite: bool = False,
) -> Path:
    """Check an export file name before any work and return the file it names.

    Parameters
    ----------
    data_dir
        The only folder the app writes to.
    name
        The file's name relative to ``data_dir`` (as :func:`resolve_under` takes it).
    suffixes
        The endings the file may have.
    protect
        Files that are never replaced, even with ``overwrite`` (the session's input).
    overwrite
        Whether an existing file may be replaced.

    Returns
    -------
    The resolved path, inside ``data_dir``.

    Raises
    ------
    InputError
        If ``name`` leaves ``data_dir``, has another ending, is longer than the file
        system allows, names a folder or a file in a missing folder, or is protected.
    ExistingFileError
        If the file exists and ``overwrite`` is false.
    """
    root = Path(data_dir).resolve()
    text = str(name).strip()
    leaf = PurePosixPath(text.replace("\\", "/")).name
    limit = _name_max(root)
    if len(os.fsencode(leaf)) > limit:
        # checked first: the OS refuses to even look up a name this long (ENAMETOOLONG)
        msg = (
            f"The file name is {len(leaf)} characters long ({len(os.fsencode(leaf))} bytes); "
            f"the file system takes names of at most {limit} bytes. Choose a shorter name."
        )
        raise InputError(msg)
    path = resolve_under(root, text)
    shown = path.relative_to(root).as_posix()
    if path.suffix.lower() not in suffixes:
        msg = (
            f"Expected a file name ending in {' or '.join(suffixes)}; found {text!r}. "
            f"Name it e.g. {Path(leaf).stem or 'results'}{suffixes[0]}."
        )
        raise InputError(msg)
    if not path.parent.is_dir():
        msg = (
            f"Cannot save {shown!r}: the folder {path.parent.relative_to(root).as_posix()!r} does not exist "
            "in the data directory. Save into an existing folder."
        )
        raise InputError(msg)
    if path.is_dir():
        msg = (
            f"Cannot save as {shown!r}: that is a folder in the data directory. "
            f"Give a file name ending in {suffixes[0]}."
        )
        raise InputError(msg)
    for protected in protect:
        if protected is not None and Path(protected).resolve() == path:
            msg = (
                f"Cannot save as {shown!r}: it is the input file of this session, "
                "which is never overwritten. Choose another name."
            )
            raise InputError(msg)
    if path.exists() and not overwrite:
        msg = (
            f"{shown!r} exists already in the data directory; "
            "it is replaced only when you confirm (overwrite)."
        )
        raise ExistingFileError(msg, path)
    return path


def write_new(write: Callable[[Path], object], path: Path, *, overwrite: bool = False) -> Path:
    """Write a file with ``write`` and put it at ``path`` in one step.

    ``write(tmp)`` writes the complete file to ``tmp``, a hidden temporary file in
    ``path``'s folder (which :func:`list_datasets` skips). Then, without ``overwrite``, a
    hard link puts it at ``path`` only if no file is there (atomic: a file another
    session saved meanwhile is never replaced); with ``overwrite``, :func:`os.replace`
    replaces ``path`` (keeping its permissions). Either way ``path`` is never half
    written, and the temporary file is removed.

    Returns
    -------
    ``path``.

    Raises
    ------
    ExistingFileError
        Without ``overwrite``, when ``path`` exists (checked again after writing).
    OSError
        What the file system refuses (permissions, a full disk).
    """
    fd, tmp_name = tempfile.mkstemp(prefix=".explorer-save-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        keep = path.stat().st_mode & 0o777 if overwrite and path.is_file() else 0o644
        tmp.chmod(keep)  # mkstemp's file is private (0600)
        if overwrite:
            os.replace(tmp, path)
            return path
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise ExistingFileError(_exists_message(path), path) from None
        except OSError as err:
            if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            # a file system without hard links: check, then rename (no longer atomic against a
            # file appearing in between, but still never over one that was there)
            if path.exists():
                raise ExistingFileError(_exists_message(path), path) from None
            os.replace(tmp, path)
        return path
    finally:
        tmp.unlink(missing_ok=True)


def _exists_message(path: Path) -> str:
    return (
        f"{path.name!r} appeared in the data directory while saving; it was left as it is. "
        "Save again to choose."
    )
