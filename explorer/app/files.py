"""Which files the app may read and write: only those under its data directory.

The browser names datasets and export files by paths relative to ``data_dir``; every
name goes through :func:`resolve_under`, which rejects absolute paths, ``..`` and links
that lead outside the folder, so a page can never make the server open another file.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from explorer._types import InputError

#: file endings the app offers as datasets (what ``explorer.data.io.read`` understands)
DATASET_SUFFIXES: tuple[str, ...] = (".h5ad", ".loom")

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
    """Dataset files (``.h5ad``, ``.loom``) under ``data_dir``, as sorted relative names.

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
            if target.is_dir() and depth < _MAX_DEPTH:
                walk(entry, depth + 1)
            elif target.is_file() and entry.suffix.lower() in DATASET_SUFFIXES:
                found.append(entry.relative_to(root).as_posix())

    walk(root, 0)
    return found
