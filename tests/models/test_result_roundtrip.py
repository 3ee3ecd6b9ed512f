"""``VelocityResult.to_adata`` then ``VelocityResult.from_adata`` gives the result back."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from explorer.keys import Key
from explorer.models.base import VelocityResult
from explorer.models.steady_state import Stochastic


def _strip_fit(adata):
    """The sample ships with a stochastic fit; remove it so the round trip starts clean."""
    for key in (Key.layers.VELOCITY, Key.layers.VELOCITY_U):
        adata.layers.pop(key, None)
    drop = [c for c in adata.var.columns if c.startswith(("velocity_", "fit_"))]
    adata.var = adata.var.drop(columns=drop)
    adata.uns.pop(Key.uns.VELOCITY_PARAMS, None)
    return adata


def test_stochastic_round_trip(sample_adata):
    adata = _strip_fit(sample_adata)
    result = Stochastic(seed=0, perc=(5, 95)).fit(adata)
    result.to_adata(adata)

    back = VelocityResult.from_adata(adata)

    assert back.model == "stochastic"
    assert back.params == result.params  # tuples and None come back as they went in
    assert back.params["perc"] == (5, 95)
    assert back.params["constrain_ratio"] is None
    assert back.obs_names.equals(result.obs_names)
    assert back.var_names.equals(result.var_names)
    np.testing.assert_array_equal(back.velocity, result.velocity)
    np.testing.assert_array_equal(back.velocity_genes, result.velocity_genes)
    assert 0 < back.velocity_genes.sum() < adata.n_vars  # some genes fail min_r2: the mask is not trivial
    pd.testing.assert_frame_equal(back.gene_params, result.gene_params, check_like=True)
    pd.testing.assert_series_equal(back.likelihood, result.likelihood, check_names=False)
    assert back.velocity_u is None
    assert back.latent_time is None
    assert back.uncertainty is None
    assert back.layers == {}


def test_round_trip_keeps_optional_arrays(sample_adata):
    adata = _strip_fit(sample_adata)
    rng = np.random.default_rng(0)
    shape = adata.shape
    names = {"obs_names": adata.obs_names, "var_names": adata.var_names}
    result = VelocityResult(
        model="dynamical",
        params={"max_iter": 5, "seed": 1},
        **names,
        velocity=rng.normal(size=shape).astype(np.float32),
        gene_params=pd.DataFrame(
            {Key.var.FIT_ALPHA: rng.random(shape[1]), Key.var.FIT_LIKELIHOOD: rng.random(shape[1])},
            index=adata.var_names,
        ),
        velocity_genes=rng.random(shape[1]) > 0.5,
        likelihood=None,
        velocity_u=rng.normal(size=shape).astype(np.float32),
        latent_time=rng.random(shape[0]).astype(np.float32),
        uncertainty=rng.random(shape[0]).astype(np.float32),
        layers={Key.layers.FIT_T: rng.random(shape).astype(np.float32)},
        obs=pd.DataFrame({Key.obs.ROOT_CELLS: rng.random(shape[0])}, index=adata.obs_names),
    )
    result.to_adata(adata)

    back = VelocityResult.from_adata(adata)

    assert back.params == {"max_iter": 5, "seed": 1}
    np.testing.assert_array_equal(back.velocity_u, result.velocity_u)
    np.testing.assert_array_equal(back.latent_time, result.latent_time)
    np.testing.assert_array_equal(back.uncertainty, result.uncertainty)
    np.testing.assert_array_equal(back.layers[Key.layers.FIT_T], result.layers[Key.layers.FIT_T])
    pd.testing.assert_frame_equal(back.obs, result.obs)
    # fit_likelihood is the likelihood of a dynamical fit
    np.testing.assert_array_equal(back.likelihood.to_numpy(), result.gene_params[Key.var.FIT_LIKELIHOOD])


def test_without_a_fit_says_what_is_missing(sample_adata):
    adata = _strip_fit(sample_adata)
    with pytest.raises(ValueError, match=r"layers\['velocity'\]"):
        VelocityResult.from_adata(adata)


def test_shipped_sample_holds_its_stochastic_fit(sample_adata):
    """The sample's stored fit is what fitting the sample again gives."""
    stored = VelocityResult.from_adata(sample_adata)
    fresh = Stochastic(**stored.params).fit(_strip_fit(sample_adata.copy()))
    assert stored.model == "stochastic"
    np.testing.assert_allclose(stored.velocity, fresh.velocity, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(stored.velocity_genes, fresh.velocity_genes)


def test_a_later_fit_removes_what_the_earlier_fit_wrote_and_nothing_else(sample_adata, tmp_path):
    import anndata as ad

    from explorer.models.dynamical import Dynamical

    adata = _strip_fit(sample_adata)
    adata.obs["my_score"] = np.arange(adata.n_obs, dtype=float)  # the user's own columns stay
    adata.var["fit_note"] = "mine"  # a fit-looking name no fit wrote: kept too
    dynamical = Dynamical(seed=0, max_iter=3).fit(adata)
    dynamical.to_adata(adata)
    assert {Key.obs.LATENT_TIME, Key.obs.ROOT_CELLS} <= set(adata.obs.columns)
    assert Key.layers.FIT_T in adata.layers
    assert Key.var.FIT_ALPHA in adata.var
    path = tmp_path / "dyn.h5ad"
    adata.write_h5ad(path)  # the record of what was written survives the file
    adata = ad.read_h5ad(path)

    stochastic = Stochastic(seed=0).fit(adata)
    stochastic.to_adata(adata)
    # the dynamical model's time, its per-cell fit and its rates no longer pose as the stochastic fit's
    assert Key.obs.LATENT_TIME not in adata.obs
    assert Key.obs.ROOT_CELLS not in adata.obs
    assert Key.layers.FIT_T not in adata.layers
    assert not {Key.var.FIT_ALPHA, Key.var.FIT_T_, Key.var.FIT_LIKELIHOOD} & set(adata.var.columns)
    assert set(stochastic.gene_params.columns) <= set(adata.var.columns)
    np.testing.assert_array_equal(adata.obs["my_score"], np.arange(adata.n_obs))
    assert (adata.var["fit_note"] == "mine").all()
    back = VelocityResult.from_adata(adata)
    assert back.model == "stochastic"
    assert back.latent_time is None
    assert back.layers == {}


def test_a_new_velocity_removes_the_fates_of_the_earlier_one(sample_adata, caplog):
    """Fates beside a velocity came from it: writing another fit removes them, with a warning.

    Until 2026-12-05 ``explorer fit`` on a file that ``explorer fates`` had written kept its
    terminal states and fate probabilities beside the new velocity, and CellRank (and the
    app) read them as the new fit's. ``keep_derived=True`` writes the same fit back (the app's
    export of a file's own fit).
    """
    from explorer.graph.fates import compute_fates
    from explorer.graph.kernels import compute_velocity_kernel

    adata = sample_adata
    compute_velocity_kernel(adata)
    compute_fates(adata, n_states=4, cluster_key=Key.obs.TRUE_LINEAGE, n_cells=20)
    own = VelocityResult.from_adata(adata)
    kept = adata.copy()
    own.to_adata(kept, keep_derived=True)
    assert Key.obsm.FATE_PROBABILITIES in kept.obsm and Key.obs.TERMINAL_STATES in kept.obs
    with caplog.at_level("WARNING", logger="explorer.models.base"):
        Stochastic(seed=1, fit_offset=True).fit(adata).to_adata(adata)
    fates_keys = {Key.obs.MACROSTATES, Key.obs.TERMINAL_STATES, Key.obs.INITIAL_STATES}
    assert not fates_keys & set(adata.obs.columns)
    assert not {Key.obsm.FATE_PROBABILITIES, Key.obsm.ABSORPTION_TIMES} & set(adata.obsm)
    assert Key.varm.LINEAGE_DRIVERS not in adata.varm and Key.uns.COARSE_TRANSITIONS not in adata.uns
    assert "Removed the fates computed from the earlier velocity" in caplog.text
    assert "`explorer fates`" in caplog.text


def test_a_new_velocity_removes_the_graphs_and_projections_of_the_earlier_one(sample_adata, caplog):
    """The velocity graph, ``T_fwd``, ``velocity_umap`` and confidences came from the earlier fit.

    Until 2026-12-05 ``result.to_adata`` left them beside the new velocity: scVelo's
    ``velocity_embedding`` (under its stream plot) reuses a stored ``velocity_graph``, and
    CellRank's estimators read ``T_fwd``, so both drew the earlier fit's directions as the
    new one's. ``derive`` computes them for the new fit; ``keep_derived=True`` writes the
    same fit back and keeps them.
    """
    from explorer.pipeline import derive

    adata = sample_adata
    earlier = {
        "obsp": {k: adata.obsp[k].copy() for k in (Key.obsp.VELOCITY_GRAPH, Key.obsp.TRANSITIONS)},
        "obsm": adata.obsm[Key.obsm.velocity("X_umap")].copy(),
    }
    assert Key.obs.VELOCITY_CONFIDENCE in adata.obs  # what the sample's stochastic fit derived
    kept = adata.copy()
    VelocityResult.from_adata(adata).to_adata(kept, keep_derived=True)
    assert Key.obsp.VELOCITY_GRAPH in kept.obsp and Key.obsm.velocity("X_umap") in kept.obsm
    with caplog.at_level("WARNING", logger="explorer.models.base"):
        result = Stochastic(seed=1, fit_offset=True, perc=(10, 90)).fit(adata)
        result.to_adata(adata)
    assert not {Key.obsp.VELOCITY_GRAPH, Key.obsp.VELOCITY_GRAPH_NEG, Key.obsp.TRANSITIONS} & set(adata.obsp)
    assert Key.obsm.velocity("X_umap") not in adata.obsm and Key.obsm.UMAP in adata.obsm
    gone = {Key.obs.VELOCITY_CONFIDENCE, Key.obs.VELOCITY_LENGTH, Key.obs.VELOCITY_SELF_TRANSITION}
    assert not gone & set(adata.obs.columns)
    assert "Removed the velocity graph, transitions and projections" in caplog.text
    derive(adata, result).to_adata(adata)
    # the new fit's graph and projection, not the earlier ones written back
    assert (adata.obsp[Key.obsp.VELOCITY_GRAPH] != earlier["obsp"][Key.obsp.VELOCITY_GRAPH]).nnz > 0
    assert not np.allclose(adata.obsm[Key.obsm.velocity("X_umap")], earlier["obsm"])
