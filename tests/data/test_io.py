from __future__ import annotations

import hashlib

import anndata as ad
import h5py
import loompy
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from explorer._types import FitCancelled, InputError
from explorer.data.io import H5adWriter, read, validate_counts, write
from explorer.keys import Key
from tests.data.conftest import h5_entries, make_counts


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_read_h5ad_round_trip(tmp_path, counts_adata):
    path = tmp_path / "counts.h5ad"
    counts_adata.write_h5ad(path)
    adata = read(path)
    assert adata.shape == counts_adata.shape
    assert adata.layers[Key.layers.SPLICED].dtype == np.float32
    np.testing.assert_array_equal(
        adata.layers[Key.layers.UNSPLICED].toarray(), counts_adata.layers["unspliced"].toarray()
    )


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match=r"file not found: .*nope\.h5ad"):
        read(tmp_path / "nope.h5ad")


def test_text_file_renamed_h5ad(tmp_path):
    path = tmp_path / "table.h5ad"
    path.write_text("gene,cell,count\nA,c1,3\n")
    with pytest.raises(
        InputError, match=r"not an AnnData \(\.h5ad\) file: expected an HDF5 file, found text"
    ):
        read(path)


def test_wrong_extension(tmp_path, counts_adata):
    path = tmp_path / "counts.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(InputError, match=r"expected a file ending in \.h5ad or \.loom, found '\.csv'"):
        read(path)


def test_hdf5_that_is_not_anndata(tmp_path):
    path = tmp_path / "other.h5ad"
    with h5py.File(path, "w") as f:
        f["data"] = np.arange(3)
    with pytest.raises(
        InputError, match=r"not an AnnData file: expected groups 'obs' and 'var', found \['data'\]"
    ):
        read(path)


def test_missing_layer_names_found_layers(tmp_path, counts_adata):
    counts_adata.layers["exon"] = counts_adata.layers.pop("spliced")
    path = tmp_path / "counts.h5ad"
    counts_adata.write_h5ad(path)
    with pytest.raises(InputError, match=r"layer 'spliced' not found") as info:
        read(path)
    message = str(info.value)
    assert "'exon'" in message
    assert "'unspliced'" in message
    assert "spliced_layer=" in message


def test_custom_layer_names_are_renamed(tmp_path, counts_adata):
    counts_adata.layers["exon"] = counts_adata.layers.pop("spliced")
    counts_adata.layers["intron"] = counts_adata.layers.pop("unspliced")
    path = tmp_path / "counts.h5ad"
    counts_adata.write_h5ad(path)
    adata = read(path, spliced_layer="exon", unspliced_layer="intron")
    assert set(adata.layers) == {"spliced", "unspliced"}
    np.testing.assert_array_equal(adata.layers["spliced"].toarray(), counts_adata.layers["exon"].toarray())


def test_layer_shape_mismatch(tmp_path, counts_adata):
    path = tmp_path / "counts.h5ad"
    counts_adata.write_h5ad(path)
    with h5py.File(path, "r+") as f:  # AnnData itself refuses such layers, so edit the file
        del f["layers/unspliced"]
        f["layers/unspliced"] = np.zeros((counts_adata.n_obs, counts_adata.n_vars + 3), dtype=np.float32)
    with pytest.raises(
        InputError, match=r"shape mismatch .*found X \(40, 12\), spliced \(40, 12\), unspliced \(40, 15\)"
    ):
        read(path)


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (-1.0, r"'unspliced' has 1 negative values \(lowest -1\)"),
        (np.nan, r"'unspliced' has 1 non-finite values"),
    ],
)
def test_bad_counts(tmp_path, value, match):
    adata = make_counts()
    u = adata.layers["unspliced"].toarray()
    u[3, 2] = value
    adata.layers["unspliced"] = sparse.csr_matrix(u)
    path = tmp_path / "bad.h5ad"
    adata.write_h5ad(path)
    with pytest.raises(InputError, match=match):
        read(path)


def test_validate_counts_no_cells(counts_adata):
    with pytest.raises(InputError, match=r"found 0 cells x 12 genes"):
        validate_counts(counts_adata[:0].copy())


def test_velocity_graph_moved_from_uns_to_obsp(tmp_path, counts_adata):
    graph = sparse.random(counts_adata.n_obs, counts_adata.n_obs, density=0.1, format="csr", random_state=0)
    counts_adata.uns["velocity_graph"] = graph
    counts_adata.uns["velocity_graph_neg"] = -graph
    path = tmp_path / "scvelo.h5ad"
    counts_adata.write_h5ad(path)
    adata = read(path)
    assert "velocity_graph" not in adata.uns
    assert "velocity_graph_neg" not in adata.uns
    np.testing.assert_array_equal(adata.obsp[Key.obsp.VELOCITY_GRAPH].toarray(), graph.toarray())
    np.testing.assert_array_equal(adata.obsp[Key.obsp.VELOCITY_GRAPH_NEG].toarray(), -graph.toarray())


def test_velocyto_loom_round_trip(tmp_path, counts_adata):
    """A loom as velocyto writes it: genes x cells, row attr Gene, col attr CellID, uint counts."""
    path = tmp_path / "velocyto.loom"
    s = counts_adata.layers["spliced"].toarray().T.astype(np.uint32)
    u = counts_adata.layers["unspliced"].toarray().T.astype(np.uint32)
    genes = np.array(counts_adata.var_names)
    genes[1] = genes[0]  # velocyto looms often repeat gene symbols
    loompy.create(
        str(path),
        {"": s, "spliced": s, "unspliced": u, "ambiguous": np.zeros_like(s)},
        row_attrs={"Gene": genes, "Accession": np.array([f"ENS{j}" for j in range(len(genes))])},
        col_attrs={"CellID": np.array(counts_adata.obs_names)},
    )
    before = _sha(path)
    adata = read(path)
    assert _sha(path) == before
    assert adata.shape == counts_adata.shape
    assert list(adata.obs_names) == list(counts_adata.obs_names)
    assert adata.var_names.is_unique
    assert adata.var_names[0] == "gene0"
    assert adata.layers["spliced"].dtype == np.float32
    np.testing.assert_array_equal(adata.layers["spliced"].toarray(), counts_adata.layers["spliced"].toarray())
    np.testing.assert_array_equal(
        adata.layers["unspliced"].toarray(), counts_adata.layers["unspliced"].toarray()
    )
    np.testing.assert_array_equal(adata.X.toarray(), counts_adata.layers["spliced"].toarray())


def test_loom_missing_layer(tmp_path, counts_adata):
    path = tmp_path / "exon.loom"
    s = counts_adata.layers["spliced"].toarray().T
    loompy.create(
        str(path),
        {"": s, "exon": s},
        row_attrs={"Gene": np.array(counts_adata.var_names)},
        col_attrs={"CellID": np.array(counts_adata.obs_names)},
    )
    with pytest.raises(
        InputError, match=r"layer 'spliced' not found in 'exon\.loom'; it has layers \['exon'\]"
    ):
        read(path)


def test_write_is_atomic_and_protects_input(tmp_path, counts_adata, monkeypatch):
    source = tmp_path / "input.h5ad"
    counts_adata.write_h5ad(source)
    before = _sha(source)
    adata = read(source)
    with pytest.raises(InputError, match=r"refusing to overwrite .*input\.h5ad"):
        write(adata, tmp_path / "." / "input.h5ad", protect=[source])
    assert _sha(source) == before

    out = write(adata, tmp_path / "out.h5ad", protect=[source])
    assert out == (tmp_path / "out.h5ad").resolve()
    assert ad.read_h5ad(out).shape == adata.shape
    written = _sha(out)

    def fail(self, path, *args, **kwargs):
        path.write_bytes(b"half a file")
        msg = "disk full"
        raise OSError(msg)

    monkeypatch.setattr(ad.AnnData, "write_h5ad", fail)
    with pytest.raises(OSError, match="disk full"):
        write(adata, out)
    assert _sha(out) == written  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input.h5ad", "out.h5ad"]  # no temp left


def test_write_rejects_unknown_extension(tmp_path, counts_adata):
    with pytest.raises(InputError, match=r"expected a name ending in \.h5ad or \.loom, found '\.csv'"):
        write(counts_adata, tmp_path / "out.csv")


def test_write_loom_round_trip(tmp_path, counts_adata):
    out = write(counts_adata, tmp_path / "out.loom")
    assert out.stat().st_mode & 0o044  # readable by others, like any new file (not mkstemp's 0600)
    adata = read(out)
    np.testing.assert_array_equal(adata.layers["spliced"].toarray(), counts_adata.layers["spliced"].toarray())
    np.testing.assert_array_equal(
        adata.layers["unspliced"].toarray(), counts_adata.layers["unspliced"].toarray()
    )
    assert list(adata.obs_names) == list(counts_adata.obs_names)


def _fitted_later(adata: ad.AnnData) -> None:
    """What a fit does to the AnnData after the writer started: new keys, one replaced, one removed."""
    rng = np.random.default_rng(1)
    adata.layers["velocity"] = rng.normal(size=adata.shape).astype(np.float32)
    adata.layers["Ms"] = adata.layers["Ms"] * 2  # replaced by another array
    del adata.obsm["X_pca"]
    n = adata.n_obs
    adata.obsp[Key.obsp.VELOCITY_GRAPH] = sparse.random(n, n, density=0.1, format="csr", rng=2)
    adata.var["fit_alpha"] = np.where(np.arange(adata.n_vars) % 3 == 0, np.nan, 1.5)
    adata.obs["latent_time"] = np.linspace(0, 1, adata.n_obs)
    adata.uns["velocity_params"] = {"mode": "dynamical", "params": {"seed": 0}}


def _with_arrays(adata: ad.AnnData) -> ad.AnnData:
    rng = np.random.default_rng(0)
    adata.obs["clusters"] = ["a", "b"] * (adata.n_obs // 2)  # strings: categorical when written
    adata.layers["Ms"] = rng.random(adata.shape, dtype=np.float32)
    adata.obsm["X_pca"] = rng.random((adata.n_obs, 3))
    adata.obsm["X_umap"] = rng.random((adata.n_obs, 2))
    adata.obsp["connectivities"] = sparse.random(adata.n_obs, adata.n_obs, density=0.2, format="csr", rng=0)
    adata.varm["PCs"] = rng.random((adata.n_vars, 3))
    adata.uns["neighbors"] = {"params": {"n_neighbors": 5, "method": "umap"}}
    return adata


def test_h5ad_writer_writes_what_write_writes(tmp_path, counts_adata):
    """Arrays written during the fit, the rest after: the file write() makes, entry for entry."""
    adata = _with_arrays(counts_adata)
    early_x, early_spliced = adata.X, adata.layers["spliced"]
    with H5adWriter(tmp_path / "early.h5ad") as writer:
        writer.add(adata)
        _fitted_later(adata)
        writer.add(adata)  # the fit's arrays, while the graph is computed
        adata.layers["velocity"] = adata.layers["velocity"] + 1  # replaced after it was handed over
        written = writer.finish(adata)
    assert written == (tmp_path / "early.h5ad").resolve()
    # the writer copies nothing
    assert adata.X is early_x
    assert adata.layers["spliced"] is early_spliced
    write(adata, tmp_path / "plain.h5ad")
    early, plain = h5_entries(tmp_path / "early.h5ad"), h5_entries(tmp_path / "plain.h5ad")
    assert early.keys() == plain.keys()
    assert [k for k in early if early[k] != plain[k]] == []
    assert "obsm/X_pca" not in early
    assert "uns/velocity_graph/data" in early
    back = ad.read_h5ad(written)
    for key in ("Ms", "velocity"):  # the replaced arrays' new values
        np.testing.assert_array_equal(back.layers[key], adata.layers[key])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["early.h5ad", "plain.h5ad"]  # no temp left


def test_h5ad_writer_takes_light_anndatas_from_several_threads(tmp_path, counts_adata, caplog):
    """Light AnnDatas holding some of the final arrays, handed over from several threads at
    once (the pipeline's derive thread and the fit's): each array written once, those still
    held at the end kept, the file as write() makes it."""
    import logging
    import threading

    adata = _with_arrays(counts_adata)
    rng = np.random.default_rng(3)
    n = adata.n_obs
    late = {f"graph_{i}": sparse.random(n, n, density=0.1, format="csr", rng=i) for i in range(8)}
    late_layers = {f"layer_{i}": rng.random(adata.shape, dtype=np.float32) for i in range(8)}

    def light(**slots):
        index = {"obs": pd.DataFrame(index=adata.obs_names), "var": pd.DataFrame(index=adata.var_names)}
        return ad.AnnData(**index, **slots)

    caplog.set_level(logging.INFO, logger="explorer.data.io")
    with H5adWriter(tmp_path / "early.h5ad") as writer:
        start = threading.Barrier(3)

        def hand_over(a):
            start.wait()
            writer.add(a)

        threads = [
            threading.Thread(target=hand_over, args=(light(obsp=late),)),
            threading.Thread(target=hand_over, args=(light(layers=late_layers),)),
        ]
        for t in threads:
            t.start()
        start.wait()
        writer.add(adata)
        for t in threads:
            t.join()
        for key, value in late.items():
            adata.obsp[key] = value
        for key, value in late_layers.items():
            adata.layers[key] = value
        adata.layers["layer_0"] = adata.layers["layer_0"] + 1  # replaced: written again at the end
        writer.finish(adata)
    write(adata, tmp_path / "plain.h5ad")
    early, plain = h5_entries(tmp_path / "early.h5ad"), h5_entries(tmp_path / "plain.h5ad")
    assert early.keys() == plain.keys()
    assert [k for k in early if early[k] != plain[k]] == []
    # every array of the final AnnData was handed over once; all but the replaced one kept
    n_arrays = 1 + sum(len(getattr(adata, slot)) for slot in ("layers", "obsm", "obsp", "varm", "varp"))
    n_early = n_arrays - 1
    assert f"{n_early} arrays were written during the fit" in caplog.text


def test_h5ad_writer_without_add_writes_everything(tmp_path, counts_adata):
    """finish() alone is a plain atomic write."""
    adata = _with_arrays(counts_adata)
    H5adWriter(tmp_path / "late.h5ad").finish(adata)
    write(adata, tmp_path / "plain.h5ad")
    assert h5_entries(tmp_path / "late.h5ad") == h5_entries(tmp_path / "plain.h5ad")


def _write_with(path, adata, *, fail: bool = False, cancel: bool = False) -> None:
    """An ``explorer fit`` in miniature: arrays handed over, then the fit fails, or the write is cancelled."""
    with H5adWriter(path) as writer:
        writer.add(adata)
        if fail:
            msg = "the fit failed"
            raise RuntimeError(msg)
        writer.finish(adata, cancelled=lambda: cancel)


def test_h5ad_writer_leaves_nothing_on_error_or_cancel(tmp_path, counts_adata):
    """A failed or cancelled fit leaves the old output as it was and no temporary file."""
    out = tmp_path / "o.h5ad"
    out.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="the fit failed"):
        _write_with(out, counts_adata, fail=True)
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.h5ad"]
    with pytest.raises(FitCancelled):
        _write_with(out, counts_adata, cancel=True)
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.h5ad"]
    _write_with(out, counts_adata)
    assert ad.read_h5ad(out).shape == counts_adata.shape


def test_h5ad_writer_raises_the_background_error(tmp_path, counts_adata):
    """An array the background thread cannot write fails the write, as write() would."""
    n_obs, n_vars = counts_adata.shape
    counts_adata.layers["bad"] = np.array([[{"a": 1}] * n_vars] * n_obs, dtype=object)
    with pytest.raises(Exception) as plain_err:  # noqa: PT011 - whatever anndata raises
        write(counts_adata, tmp_path / "plain.h5ad")
    with pytest.raises(type(plain_err.value)):
        _write_with(tmp_path / "early.h5ad", counts_adata)
    assert not list(tmp_path.iterdir())


def test_h5ad_writer_creates_its_temporary_file_without_truncating_one(tmp_path, counts_adata, monkeypatch):
    """The temporary file is created by HDF5 exclusively (never an existing file truncated: on
    ext4 that makes the close write the whole file out); a name already taken is skipped, its
    file left as it was; the file is private until it is put in place."""
    import secrets
    import types

    out = tmp_path / "o.h5ad"
    taken = tmp_path / ".o.h5ad.taken.h5ad"
    taken.write_bytes(b"someone else's")
    names = iter(["taken", "fresh"])
    monkeypatch.setattr(secrets, "token_hex", lambda _n: next(names))
    opened = []

    class Spy(h5py.File):  # every file explorer.data.io opens, with its mode
        def __init__(self, name, mode="r", *args, **kwargs):
            opened.append((str(name), mode))
            super().__init__(name, mode, *args, **kwargs)

    spied = types.ModuleType("h5py")
    spied.__dict__.update(vars(h5py))
    spied.File = Spy
    monkeypatch.setattr("explorer.data.io.h5py", spied)
    with H5adWriter(out) as writer:
        writer.add(counts_adata)
        assert writer._tmp.stat().st_mode & 0o777 == 0o600  # private while it is written
        writer.finish(counts_adata)
    assert (str(taken), "x") in opened
    assert (str(tmp_path / ".o.h5ad.fresh.h5ad"), "x") in opened
    assert not [m for _, m in opened if m in ("w", "w-")]
    assert taken.read_bytes() == b"someone else's"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".o.h5ad.taken.h5ad", "o.h5ad"]
    assert ad.read_h5ad(out).shape == counts_adata.shape


def test_h5ad_writer_checks_its_target_first(tmp_path, counts_adata):
    source = tmp_path / "input.h5ad"
    source.write_bytes(b"input")
    with pytest.raises(InputError, match="refusing to overwrite"):
        H5adWriter(source, protect=[source])
    with pytest.raises(InputError, match=r"expected a name ending in \.h5ad, found '\.loom'"):
        H5adWriter(tmp_path / "out.loom")
