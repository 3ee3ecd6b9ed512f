"""Read and write spliced/unspliced count data, checking it at the boundary.

``read`` opens ``.h5ad`` (AnnData) and ``.loom`` (velocyto, STARsolo via loompy) files,
renames custom count layers to ``spliced`` / ``unspliced``, moves scVelo's
``uns['velocity_graph']`` / ``uns['velocity_graph_neg']`` into ``obsp`` and checks the
counts. Every problem with the input raises :class:`~explorer._types.InputError` with a
message that says what was expected, what was found and what to do. The input file is
only ever opened read-only.

``write`` writes atomically (a temporary file in the target's folder, then
:func:`os.replace`), so a crash never leaves half a file, and refuses to overwrite the
paths it is told to protect (the input).
"""

from __future__ import annotations

import logging
import os
import queue
import secrets
import tempfile
import threading
import warnings
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anndata as ad
import h5py
import numpy as np
from anndata.io import read_elem
from scipy import sparse

from explorer._types import FitCancelled, InputError, option
from explorer.keys import Key

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    import zarr
    from anndata import AnnData

logger = logging.getLogger(__name__)

#: the first bytes of every HDF5 file (.h5ad and .loom are both HDF5)
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
SUFFIXES: tuple[str, ...] = (".h5ad", ".loom")
#: AnnData's zarr store, a folder: :func:`read` opens it lazily (:func:`read_zarr_lazy`)
ZARR_SUFFIX = ".zarr"
#: velocyto's loom attributes for gene and cell names (loompy's defaults come second)
_LOOM_VAR_NAMES = ("Gene", "var_names", "gene_names", "Accession")
_LOOM_OBS_NAMES = ("CellID", "obs_names", "cell_names")
#: read and UMI counts stay far below this; squares of larger values overflow float32 in the
#: variance and second moments, so such values are refused rather than turned into inf
MAX_VALUE = 1e12

#: the zarr array behind each layer :func:`read_zarr_lazy` opened, by the layer's ``id``
#: (with a weak reference to the layer, which drops the entry when the layer goes)
_ZARR_BEHIND: dict[int, tuple[weakref.ref, zarr.Array]] = {}


def read(
    path: str | os.PathLike[str],
    *,
    spliced_layer: str = Key.layers.SPLICED,
    unspliced_layer: str = Key.layers.UNSPLICED,
) -> AnnData:
    """Read an ``.h5ad`` or velocyto ``.loom`` file with spliced and unspliced counts.

    An AnnData ``.zarr`` folder is opened lazily instead (:func:`read_zarr_lazy`): its
    layers stay on disk and are read by chunks when used.

    Parameters
    ----------
    path
        File to read; opened read-only and never modified.
    spliced_layer, unspliced_layer
        Names of the count layers in the file. Layers with other names are renamed to
        ``spliced`` / ``unspliced`` on read.

    Returns
    -------
    The AnnData, with ``layers['spliced']`` and ``layers['unspliced']`` (float32, CSR
    when the file stores them sparse) and, when the file had scVelo's
    ``uns['velocity_graph']`` / ``uns['velocity_graph_neg']``, those in ``obsp``.

    Raises
    ------
    InputError
        Missing file, a file that is not an AnnData/loom file, missing layers, layers of
        different shapes, negative or non-finite counts.

    Examples
    --------
    >>> adata = read("pancreas.h5ad")  # doctest: +SKIP
    >>> adata = read("sample.loom", spliced_layer="exon", unspliced_layer="intron")  # doctest: +SKIP
    """
    path = Path(path)
    if not path.exists():
        msg = (
            f"file not found: {str(path)!r}; expected an existing {' or '.join(SUFFIXES)} file. "
            "Check the path."
        )
        raise InputError(msg)
    if path.is_dir() and path.suffix.lower() == ZARR_SUFFIX:
        return read_zarr_lazy(path, spliced_layer=spliced_layer, unspliced_layer=unspliced_layer)
    if path.is_dir():
        msg = f"{str(path)!r} is a folder; expected an {' or '.join(SUFFIXES)} file."
        raise InputError(msg)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        msg = (
            f"cannot read {path.name!r}: expected a file ending in {' or '.join(SUFFIXES)}, found "
            f"{suffix or 'no extension'!r}. Convert it to .h5ad (e.g. with anndata or scanpy) first."
        )
        raise InputError(msg)
    _check_hdf5(path, suffix)
    layer_shapes = _stored_shapes(path, suffix)
    _check_layers(layer_shapes, spliced_layer=spliced_layer, unspliced_layer=unspliced_layer, path=path)

    adata = _read_loom(path) if suffix == ".loom" else _read_h5ad(path)
    _rename_layers(adata, spliced_layer=spliced_layer, unspliced_layer=unspliced_layer)
    _move_graphs_to_obsp(adata)
    for key in (Key.layers.SPLICED, Key.layers.UNSPLICED):
        adata.layers[key] = _as_float32(adata.layers[key])
    if adata.X is None:
        # velocyto's main matrix is the spliced counts; an h5ad without X gets the same
        adata.X = adata.layers[Key.layers.SPLICED].copy()
    validate_counts(adata)
    logger.info("read %s: %d cells x %d genes", path, adata.n_obs, adata.n_vars)
    return adata


def read_zarr_lazy(
    path: str | os.PathLike[str],
    *,
    spliced_layer: str = Key.layers.SPLICED,
    unspliced_layer: str = Key.layers.UNSPLICED,
) -> AnnData:
    """Open an AnnData ``.zarr`` store with its layers left on disk, read by chunks on demand.

    obs, var, obsm, obsp and uns are read into memory (``O(n_obs x k + n_edges)``); every
    layer (and X) is a Dask array over the store's chunks (anndata's ``read_elem_lazy``),
    so ``adata.layers['Ms'][:, j]`` reads only the chunks that hold gene ``j``, and nothing
    holds a ``(n_obs, n_vars)`` matrix until asked. This is how ``explorer serve
    atlas.zarr`` opens what :func:`explorer.stream.fit_streamed` writes.

    The layers' values are not checked on open (that would read them all): the store must
    have ``spliced``/``unspliced`` or ``Ms``/``Mu`` layers; their shapes are checked.

    Raises
    ------
    InputError
        Not an AnnData store, or neither pair of layers in it.
    """
    # anndata's lazy reader imports Dask, and zarr is read here only (deliberate lazy loads,
    # explorer/__init__.py)
    import zarr
    from anndata.experimental import read_elem_lazy

    path = Path(path)
    try:
        root = zarr.open_group(str(path), mode="r")
        names = set(root.keys())
    except Exception as err:  # zarr raises several types for what is not a store
        msg = f"could not open {path.name!r} as a zarr store ({type(err).__name__}: {err}); expected an AnnData .zarr folder."
        raise InputError(msg) from None
    if "obs" not in names or "var" not in names:
        msg = f"{path.name!r} is not an AnnData store: expected groups 'obs' and 'var', found {sorted(names)}."
        raise InputError(msg)
    layer_names = sorted(root["layers"].keys()) if "layers" in names else []
    counts = {spliced_layer, unspliced_layer} <= set(layer_names)
    moments = {Key.layers.MS, Key.layers.MU} <= set(layer_names)
    if not counts and not moments:
        msg = (
            f"{path.name!r} has neither layers {[spliced_layer, unspliced_layer]} nor Ms/Mu: found layers "
            f"{layer_names}. Open a store written by `explorer fit` (or anndata's write_zarr of one), or pass "
            f"{option('spliced_layer')} and {option('unspliced_layer')}."
        )
        raise InputError(msg)
    obs, var = read_elem(root["obs"]), read_elem(root["var"])
    shape = (len(obs), len(var))
    layers = {}
    for name in layer_names:
        layers[name] = read_elem_lazy(root["layers"][name])
        _remember_zarr(layers[name], root["layers"][name])
        if tuple(layers[name].shape) != shape:
            msg = f"layer {name!r} of {path.name!r} has shape {tuple(layers[name].shape)}; expected {shape} (cells x genes)."
            raise InputError(msg)
    adata = ad.AnnData(
        X=read_elem_lazy(root["X"]) if "X" in names else None,
        obs=obs,
        var=var,
        obsm=read_elem(root["obsm"]) if "obsm" in names else None,
        obsp=read_elem(root["obsp"]) if "obsp" in names else None,
        uns=read_elem(root["uns"]) if "uns" in names else None,
        layers=layers,
    )
    if counts:
        _rename_layers(adata, spliced_layer=spliced_layer, unspliced_layer=unspliced_layer)
    _move_graphs_to_obsp(adata)
    logger.info("opened %s lazily: %d cells x %d genes, layers %s", path, adata.n_obs, adata.n_vars, layer_names)
    return adata


def _remember_zarr(layer: object, array: object) -> None:
    """Note that Dask array ``layer`` reads zarr array ``array`` as it is (for :func:`read_column`)."""
    import zarr

    if not isinstance(array, zarr.Array) or tuple(array.shape) != tuple(getattr(layer, "shape", ())):
        return
    key = id(layer)
    _ZARR_BEHIND[key] = (weakref.ref(layer, lambda _: _ZARR_BEHIND.pop(key, None)), array)


def read_column(matrix: Any, j: int) -> np.ndarray:
    """Column ``j`` of an ``(n_obs, n_vars)`` matrix as a NumPy array ``(n_obs,)`` of its dtype.

    ``matrix`` may be dense, sparse, or a layer :func:`read_zarr_lazy` left on disk: such
    a layer is read straight from its zarr array, whose one call reads the column's
    chunks together. Through Dask the same column took 2-3 times as long (13 ms against
    6 ms for the 8 chunks of a gene of 10^6 cells), which a gene click in the app pays
    for each layer it shows.
    """
    found = _ZARR_BEHIND.get(id(matrix))
    if found is not None and found[0]() is matrix:
        return np.asarray(found[1][:, j]).ravel()
    col = matrix[:, j]
    if hasattr(col, "toarray"):
        col = col.toarray()
    return np.asarray(col).ravel()


def validate_counts(adata: AnnData) -> None:
    """Check that ``adata`` has usable spliced and unspliced counts.

    Parameters
    ----------
    adata
        Data to check; not modified.

    Raises
    ------
    InputError
        When a layer is missing, the layers' shapes differ from ``adata``'s, there are no
        cells or genes, or a layer holds negative or non-finite values.
    """
    found = list(adata.layers.keys())
    for key, arg in ((Key.layers.SPLICED, "spliced_layer"), (Key.layers.UNSPLICED, "unspliced_layer")):
        if key not in adata.layers:
            msg = (
                f"layer {key!r} not found; adata.layers has {found}. Load velocyto/STARsolo output "
                f"or pass {option(arg)} with the name of the {key} counts."
            )
            raise InputError(msg)
    if adata.n_obs == 0 or adata.n_vars == 0:
        msg = f"no data: found {adata.n_obs} cells x {adata.n_vars} genes; expected at least one of each."
        raise InputError(msg)
    for key in (Key.layers.SPLICED, Key.layers.UNSPLICED):
        values = _values(adata.layers[key])
        if values.size == 0:
            continue
        if not np.isfinite(values).all():
            n_bad = int(np.count_nonzero(~np.isfinite(values)))
            msg = (
                f"layer {key!r} has {n_bad} non-finite values (NaN or inf); expected finite counts. "
                "Remove or fix those cells/genes before loading."
            )
            raise InputError(msg)
        lowest = values.min()
        if lowest < 0:
            n_bad = int(np.count_nonzero(values < 0))
            msg = (
                f"layer {key!r} has {n_bad} negative values (lowest {float(lowest):g}); "
                "expected counts >= 0. Pass raw or normalised (not scaled/centred) counts."
            )
            raise InputError(msg)
        highest = values.max()
        if highest > MAX_VALUE:
            n_bad = int(np.count_nonzero(values > MAX_VALUE))
            msg = (
                f"layer {key!r} has {n_bad} values above {MAX_VALUE:g} (highest {float(highest):g}); "
                "expected counts, which stay far below that. Check that the layer holds counts "
                "(not, e.g., exponentiated values) or rescale it."
            )
            raise InputError(msg)


def check_output(
    path: str | os.PathLike[str],
    *,
    protect: Iterable[str | os.PathLike[str]] = (),
    overwrite: bool = True,
    suffixes: tuple[str, ...] | None = SUFFIXES,
) -> Path:
    """Check, before any work, that :func:`write` can write ``path``; return it resolved.

    Parameters
    ----------
    path
        The file to write.
    protect
        Paths that must never be overwritten, typically the input file.
    overwrite
        Whether an existing file at ``path`` may be replaced.
    suffixes
        The extensions ``path`` may have (default: what :func:`write` writes); None for
        any (a caller that writes something else and checked the name itself).

    Raises
    ------
    InputError
        When ``path`` is one of ``protect``, exists and ``overwrite`` is false, is a
        folder, has an extension other than ``.h5ad``/``.loom``, or its folder does not
        exist.
    """
    path = Path(path)
    target = path.resolve()
    for protected in protect:
        if Path(protected).resolve() == target:
            msg = (
                f"refusing to overwrite {str(path)!r}: it is the input file and is kept unchanged. "
                "Write to a new file name instead."
            )
            raise InputError(msg)
    suffix = path.suffix.lower()
    if suffixes is not None and suffix not in suffixes:
        msg = (
            f"cannot write {path.name!r}: expected a name ending in {' or '.join(suffixes)}, "
            f"found {suffix or 'no extension'!r}. Name the output e.g. {path.stem or 'out'}{suffixes[0]}."
        )
        raise InputError(msg)
    if not target.parent.is_dir():
        msg = (
            f"cannot write {str(path)!r}: folder {str(target.parent)!r} does not exist. "
            "Create it first or write to an existing folder."
        )
        raise InputError(msg)
    if target.is_dir():
        ending = f" ending in {suffixes[0]}" if suffixes else ""
        msg = f"cannot write {str(path)!r}: it is a folder; expected a file name{ending}."
        raise InputError(msg)
    if target.exists() and not overwrite:
        msg = (
            f"{str(path)!r} exists already; explorer does not overwrite files unless asked. "
            f"Choose another name, or pass {option('force')} to replace it."
        )
        raise InputError(msg)
    return target


def write(
    adata: AnnData,
    path: str | os.PathLike[str],
    *,
    protect: Iterable[str | os.PathLike[str]] = (),
    overwrite: bool = True,
    cancelled: Callable[[], bool] | None = None,
) -> Path:
    """Write ``adata`` to ``.h5ad`` or ``.loom`` atomically.

    The data go to a temporary file in the same folder, which then replaces ``path`` in
    one step (:func:`os.replace`), so ``path`` is either the old file or the complete new
    one, never half written.

    Parameters
    ----------
    adata
        Data to write.
    path
        Target file; the extension picks the format.
    protect
        Paths that must never be overwritten, typically the file the data came from.
    overwrite
        Whether an existing file at ``path`` may be replaced (the default, as before).
    cancelled
        Asked once the data are in the temporary file, just before it replaces ``path``:
        when it returns true, nothing is written and :class:`~explorer._types.FitCancelled`
        is raised (``explorer fit`` passes its Ctrl-C flag).

    Returns
    -------
    The path written.

    Raises
    ------
    InputError
        As :func:`check_output`.
    FitCancelled
        When ``cancelled()`` is true before the file is put in place.
    """
    path = Path(path)
    target = check_output(path, protect=protect, overwrite=overwrite)
    suffix = path.suffix.lower()
    tmp = _temporary_beside(target, suffix)
    try:
        if suffix == ".loom":
            logger.warning("loom keeps layers, obs, var and obsm only (no obsp, uns); use .h5ad to keep all")
            tmp.unlink()  # loompy refuses to write over an existing file
            adata.write_loom(tmp, write_obsm_varm=True)
        else:
            _with_scvelo_graphs(adata).write_h5ad(tmp)
        _put_in_place(tmp, target, cancelled)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _temporary_beside(target: Path, suffix: str) -> Path:
    """Make a new empty file in ``target``'s folder, for an atomic write of it (:func:`_put_in_place`)."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
    os.close(fd)
    return Path(tmp_name)


def _new_hdf5_beside(target: Path, suffix: str) -> tuple[Path, h5py.File]:
    """Create a new HDF5 file under a unique hidden name in ``target``'s folder; return it, open.

    For :class:`H5adWriter`, as :func:`_temporary_beside` for :func:`write`, but HDF5
    creates the file itself, exclusively (mode ``"x"``: ``O_CREAT | O_EXCL``), rather
    than truncating an empty file that :func:`tempfile.mkstemp` made (mode ``"w"``:
    ``O_TRUNC``). ext4 (with its default ``auto_da_alloc``) writes a file that was
    truncated to zero out to disk when it is closed, in the closing call: 45-75 ms for
    ``explorer fit``'s 150 MB output on the development VM, at the end of the command,
    where nothing else runs. Created this way, the file is written back by the kernel
    later, as any new file is; replacing an existing file still has ext4 write the new
    one out first (in :func:`os.replace`), so the replace stays safe against a crash.
    """
    for _ in range(100):
        tmp = target.parent / f".{target.name}.{secrets.token_hex(6)}{suffix}"
        try:
            file = h5py.File(tmp, "x")
        except FileExistsError:  # that name is taken: draw another
            continue
        tmp.chmod(0o600)  # private while it is written, as mkstemp's (still empty here)
        return tmp, file
    msg = f"could not create a temporary file beside {target} (100 names taken)"
    raise FileExistsError(msg)


def _put_in_place(tmp: Path, target: Path, cancelled: Callable[[], bool] | None) -> None:
    """Replace ``target`` by the written ``tmp`` in one step; :class:`FitCancelled` if ``cancelled()``."""
    # the temporary file is private (0600): keep the replaced file's mode, else rw-r--r--
    tmp.chmod(target.stat().st_mode & 0o777 if target.exists() else 0o644)
    if cancelled is not None and cancelled():
        raise FitCancelled
    os.replace(tmp, target)
    logger.info("wrote %s", target)


#: the AnnData slots that hold one array per key (what :class:`H5adWriter` may write early)
_ARRAY_SLOTS = ("layers", "obsm", "obsp", "varm", "varp")


class H5adWriter:
    """An atomic ``.h5ad`` write (as :func:`write`) whose arrays go to disk while the fit runs.

    ``explorer fit`` reads a file, fits, and writes the input back with the fit's keys
    added; about half of the output's bytes (``X``, the count and moment layers, the kNN
    graphs, the embeddings) are the input's arrays, unchanged by the fit, and the
    velocity layers are known before the velocity graph is. :meth:`add` hands the
    AnnData's arrays to a background thread that writes them into the temporary file
    (h5py releases the GIL while it writes a dataset, so the fit keeps its core), and can
    be called again as arrays appear; :meth:`finish` writes the rest as
    ``AnnData.write_h5ad`` would (obs, var, uns, raw and every array that is new,
    replaced or removed since it was added) and puts the file in place. The file holds
    the same groups, datasets and attributes as :func:`write`'s.

    An array written early is kept only if the AnnData still holds the very same object
    at :meth:`finish` (explorer's fits add and replace keys, never modify an array in
    place). Used as a context manager, the temporary file is removed whenever
    :meth:`finish` did not complete (an error, Ctrl-C), after the thread has stopped.

    Parameters
    ----------
    path
        Target ``.h5ad`` file.
    protect, overwrite
        As :func:`write` (checked here, before any work, and again in :meth:`finish`).

    Examples
    --------
    >>> with H5adWriter("out.h5ad") as writer:  # doctest: +SKIP
    ...     writer.add(adata)  # the input's arrays, while ...
    ...     fit_and_add_keys(adata)  # ... the fit runs
    ...     writer.finish(adata)
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        protect: Iterable[str | os.PathLike[str]] = (),
        overwrite: bool = True,
    ) -> None:
        self.path = Path(path)
        self._protect = list(protect)
        self._overwrite = overwrite
        check_output(self.path, protect=self._protect, overwrite=overwrite, suffixes=(".h5ad",))
        self._tmp: Path | None = None
        self._thread: threading.Thread | None = None
        self._queue: queue.SimpleQueue[tuple[str, str, object] | None] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        #: (slot, key) -> the array handed to the thread; ("X", "") for X
        self._early: dict[tuple[str, str], object] = {}
        #: add() may be called from the fit's threads (explorer.pipeline.run_velocity)
        self._lock = threading.Lock()

    def __enter__(self) -> H5adWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(self, adata: AnnData) -> None:
        """Hand ``adata``'s arrays not handed over yet to the background thread, which writes them.

        Arrays of ``X``, ``layers``, ``obsm``, ``obsp``, ``varm`` and ``varp`` that are
        numpy arrays or scipy sparse matrices; a key already handed over is skipped (even
        if its array was replaced since: :meth:`finish` rewrites it). ``adata`` may also be
        a light AnnData holding some of the arrays the written one will hold (the same
        objects); safe to call from several threads.
        """
        items = [("X", "", adata.X)]
        items += [(slot, key, value) for slot in _ARRAY_SLOTS for key, value in getattr(adata, slot).items()]
        with self._lock:
            if self._thread is None:
                self._tmp, file = _new_hdf5_beside(self.path.resolve(), ".h5ad")
                self._thread = threading.Thread(
                    target=self._write_queued, args=(file,), name="explorer-h5ad", daemon=True
                )
                self._thread.start()
            for slot, key, value in items:
                if (slot, key) not in self._early and _plain_array(value):
                    self._early[slot, key] = value
                    self._queue.put((slot, key, value))

    def _write_queued(self, file: h5py.File) -> None:
        from anndata.io import write_elem

        try:
            with file as f:
                # write_h5ad's root attributes
                f.attrs.setdefault("encoding-type", "anndata")
                f.attrs.setdefault("encoding-version", "0.1.0")
                while (item := self._queue.get()) is not None:
                    if self._stop.is_set():
                        return
                    slot, key, value = item
                    if slot == "X":
                        write_elem(f, "X", value)
                        continue
                    if slot not in f:
                        write_elem(f, slot, {})  # the mapping's group with its encoding attributes
                    write_elem(f[slot], key, value)
        except BaseException as err:  # noqa: BLE001 - handed to finish(), which raises it
            self._error = err

    def _join(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()

    def finish(self, adata: AnnData, *, cancelled: Callable[[], bool] | None = None) -> Path:
        """Write what :meth:`add` did not, then put the file in place; return the path written.

        Raises
        ------
        InputError
            As :func:`check_output`.
        FitCancelled
            When ``cancelled()`` is true before the file is put in place (nothing written).
        """
        from anndata.io import write_elem

        target = check_output(self.path, protect=self._protect, overwrite=self._overwrite)
        out = _with_scvelo_graphs(adata)
        # as write_h5ad does before it writes
        out.strings_to_categoricals()
        if out.raw is not None:
            out.strings_to_categoricals(out.raw.var)
        during_fit = set(self._early)
        self.add(out)  # whatever is still missing (all of it if add() was never called)
        self._join()
        if self._error is not None:
            raise self._error
        assert self._tmp is not None
        with h5py.File(self._tmp, "a") as f:
            if out.X is None:
                f.pop("X", None)
            elif "X" not in f or self._early.get(("X", "")) is not out.X:
                write_elem(f, "X", out.X)
            if out.raw is not None:
                write_elem(f, "raw", out.raw)
            write_elem(f, "obs", out.obs)
            write_elem(f, "var", out.var)
            for slot in _ARRAY_SLOTS:
                current = dict(getattr(out, slot))
                if slot not in f:
                    write_elem(f, slot, current)
                    continue
                group = f[slot]
                for key in list(group):
                    if key not in current or self._early.get((slot, key)) is not current[key]:
                        del group[key]  # replaced or removed since it was added
                for key, value in current.items():
                    if key not in group:
                        write_elem(group, key, value)
            write_elem(f, "uns", dict(out.uns))
        kept = [k for k in during_fit if self._early[k] is _array_at(out, *k)]
        logger.info("%d arrays were written during the fit", len(kept))
        _put_in_place(self._tmp, target, cancelled)
        self._tmp = None
        return target

    def close(self) -> None:
        """Stop the background write and remove the temporary file, unless :meth:`finish` completed."""
        self._stop.set()
        try:
            self._join()
        finally:  # even if a second Ctrl-C cuts the wait short (the thread's open file goes with it)
            if self._tmp is not None:
                self._tmp.unlink(missing_ok=True)
                self._tmp = None


def _array_at(adata: AnnData, slot: str, key: str) -> object:
    """``adata.X`` for slot ``"X"``, else ``adata.<slot>[key]`` (None when absent)."""
    return adata.X if slot == "X" else getattr(adata, slot).get(key)


def _plain_array(value: object) -> bool:
    """Whether ``value`` is an in-memory numpy array or scipy sparse matrix (what is written early)."""
    return isinstance(value, np.ndarray) or sparse.issparse(value)


# ---------------------------------------------------------------------------------------
# helpers


def _with_scvelo_graphs(adata: AnnData) -> AnnData:
    """``adata``, or a shallow copy whose ``uns`` also holds the velocity graphs from ``obsp``.

    We keep cell-by-cell graphs in ``obsp`` so they subset with the cells, but scVelo
    0.3.4's ``tl.transition_matrix`` (behind ``tl.velocity_embedding``,
    ``tl.terminal_states``, ``tl.latent_time``) reads only ``uns['velocity_graph']`` and
    ``uns['velocity_graph_neg']``; written files carry both so scVelo's tools run on them.
    The AnnData in memory is left as it is.
    """
    keys = [k for k in (Key.obsp.VELOCITY_GRAPH, Key.obsp.VELOCITY_GRAPH_NEG) if k in adata.obsp]
    if not keys or all(k in adata.uns for k in keys):
        return adata
    out = ad.AnnData(
        X=adata.X,
        obs=adata.obs,
        var=adata.var,
        uns=dict(adata.uns),
        obsm=dict(adata.obsm),
        varm=dict(adata.varm),
        layers=dict(adata.layers),
        obsp=dict(adata.obsp),
        varp=dict(adata.varp),
        raw=adata.raw.to_adata() if adata.raw is not None else None,
    )
    for k in keys:
        out.uns[k] = adata.obsp[k]
    return out


def _check_hdf5(path: Path, suffix: str) -> None:
    with path.open("rb") as fh:
        head = fh.read(len(_HDF5_SIGNATURE))
    if head != _HDF5_SIGNATURE:
        kind = "AnnData (.h5ad)" if suffix == ".h5ad" else "loom"
        looks = "text" if head and all(32 <= b < 127 or b in (9, 10, 13) for b in head) else "not HDF5"
        msg = (
            f"{path.name!r} is not an {kind} file: expected an HDF5 file, found {looks} "
            f"(first bytes {head!r}). Check that the file is complete and has the right extension."
        )
        raise InputError(msg)


def _stored_shapes(path: Path, suffix: str) -> dict[str, tuple[int, int]]:
    """Shapes (n_obs, n_vars) of X and every layer, read from the HDF5 metadata only."""
    shapes: dict[str, tuple[int, int]] = {}
    try:
        with h5py.File(path, "r") as f:
            if suffix == ".loom":
                if "matrix" not in f:
                    msg = f"{path.name!r} is HDF5 but not a loom file: no '/matrix' dataset found."
                    raise InputError(msg)
                # loom stores genes x cells
                n_vars, n_obs = f["matrix"].shape
                shapes["X"] = (n_obs, n_vars)
                for name, node in f.get("layers", {}).items():
                    if name:  # loompy keeps the main matrix also as layer ''
                        shapes[name] = tuple(node.shape[::-1])
            else:
                if "obs" not in f or "var" not in f:
                    msg = (
                        f"{path.name!r} is HDF5 but not an AnnData file: expected groups 'obs' and 'var', "
                        f"found {sorted(f.keys())}."
                    )
                    raise InputError(msg)
                if "X" in f:
                    shapes["X"] = _h5ad_shape(f["X"])
                for name, node in f.get("layers", {}).items():
                    shapes[name] = _h5ad_shape(node)
    except OSError as err:
        msg = f"could not open {path.name!r} as HDF5 ({err}); expected a complete {suffix} file."
        raise InputError(msg) from err
    return shapes


def _h5ad_shape(node: object) -> tuple[int, int]:
    attrs = getattr(node, "attrs", {})
    if "shape" in attrs:  # sparse matrices are groups with a shape attribute
        return tuple(int(n) for n in attrs["shape"])
    return tuple(int(n) for n in node.shape)


def require_layers(layers: list[str], *, spliced_layer: str, unspliced_layer: str, path: Path) -> None:
    """Raise InputError naming the layers there are when ``layers`` lacks the spliced or unspliced one."""
    for name, arg in ((spliced_layer, "spliced_layer"), (unspliced_layer, "unspliced_layer")):
        if name not in layers:
            msg = (
                f"layer {name!r} not found in {path.name!r}; it has layers {layers}. Load velocyto/STARsolo "
                f"output with spliced and unspliced counts, or pass {option(arg)} naming one of {layers}."
            )
            raise InputError(msg)


def _check_layers(
    shapes: dict[str, tuple[int, int]], *, spliced_layer: str, unspliced_layer: str, path: Path
) -> None:
    layers = [name for name in shapes if name != "X"]
    require_layers(layers, spliced_layer=spliced_layer, unspliced_layer=unspliced_layer, path=path)
    wanted = {
        "X": shapes.get("X"),
        spliced_layer: shapes[spliced_layer],
        unspliced_layer: shapes[unspliced_layer],
    }
    wanted = {k: v for k, v in wanted.items() if v is not None}
    if len(set(wanted.values())) > 1:
        found = ", ".join(f"{k} {v}" for k, v in wanted.items())
        msg = (
            f"shape mismatch in {path.name!r}: expected {spliced_layer!r} and {unspliced_layer!r} "
            f"(and X) to be cells x genes of the same shape, found {found}."
        )
        raise InputError(msg)


def _read_h5ad(path: Path) -> AnnData:
    try:
        with warnings.catch_warnings(record=True) as caught:
            # e.g. anndata's OldFormatWarning for files written by anndata < 0.7: they
            # read fine, so tell the log rather than fail
            warnings.simplefilter("always")
            adata = ad.read_h5ad(path)
    except Exception as err:  # anndata raises many types for broken files
        msg = f"could not read {path.name!r} as AnnData: {type(err).__name__}: {err}"
        raise InputError(msg) from err
    for w in caught:
        logger.info("reading %s: %s", path.name, w.message)
    return adata


def _read_loom(path: Path) -> AnnData:
    with h5py.File(path, "r") as f:
        row_attrs = set(f.get("row_attrs", {}).keys())
        col_attrs = set(f.get("col_attrs", {}).keys())
    var_names = next((n for n in _LOOM_VAR_NAMES if n in row_attrs), None)
    obs_names = next((n for n in _LOOM_OBS_NAMES if n in col_attrs), None)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            adata = ad.read_loom(
                path,
                sparse=True,
                cleanup=False,
                var_names=var_names or "var_names",
                obs_names=obs_names or "obs_names",
            )
    except Exception as err:
        msg = f"could not read {path.name!r} as loom: {type(err).__name__}: {err}"
        raise InputError(msg) from err
    for w in caught:  # e.g. "Variable names are not unique": fixed just below
        logger.info("reading %s: %s", path.name, w.message)
    if not adata.var_names.is_unique:
        adata.var_names_make_unique()
    if not adata.obs_names.is_unique:
        adata.obs_names_make_unique()
    return adata


def _rename_layers(adata: AnnData, *, spliced_layer: str, unspliced_layer: str) -> None:
    renames = {spliced_layer: Key.layers.SPLICED, unspliced_layer: Key.layers.UNSPLICED}
    moved = {old: adata.layers[old] for old, new in renames.items() if old != new}
    for old, new in renames.items():
        if old == new:
            continue
        if new in adata.layers and new not in renames:
            logger.info("layer %r replaced by %r", new, old)
        del adata.layers[old]
    for old, value in moved.items():
        adata.layers[renames[old]] = value


def _move_graphs_to_obsp(adata: AnnData) -> None:
    """Move scVelo's cell-by-cell graphs from ``uns`` to ``obsp`` (where they subset with cells)."""
    for key in (Key.obsp.VELOCITY_GRAPH, Key.obsp.VELOCITY_GRAPH_NEG):
        if key not in adata.uns:
            continue
        graph = adata.uns[key]
        if getattr(graph, "shape", None) != (adata.n_obs, adata.n_obs):
            logger.warning(
                "uns[%r] has shape %s, expected (%d, %d); left in uns",
                key,
                getattr(graph, "shape", None),
                adata.n_obs,
                adata.n_obs,
            )
            continue
        adata.obsp[key] = sparse.csr_matrix(graph)
        del adata.uns[key]


def _as_float32(matrix: object) -> object:
    if sparse.issparse(matrix):
        matrix = sparse.csr_matrix(matrix)
        return matrix if matrix.dtype == np.float32 else matrix.astype(np.float32)
    matrix = np.asarray(matrix)
    return matrix if matrix.dtype == np.float32 else matrix.astype(np.float32)


def _values(matrix: object) -> np.ndarray:
    """Return the stored values of a sparse matrix, or all values of a dense one."""
    if sparse.issparse(matrix):
        return np.asarray(matrix.data)
    return np.asarray(matrix).ravel()
