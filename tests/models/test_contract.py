"""Every registered model passes the same checks (STYLE.md section 6)."""

from __future__ import annotations

import numpy as np
import pytest

from explorer import MODELS, FitCancelled, VelocityResult, get_model
from explorer._types import InputError
from explorer.pipeline import prepare
from explorer.data.simulate import simulate
from explorer.keys import Key


#: hyperparameters that keep a trained model's contract checks fast (a few epochs)
FAST_PARAMS: dict[str, dict] = {
    "velovae": {"max_epochs": 4, "max_epochs_stage2": 2, "n_samples": 4},
    "vector_field": {"epochs": 5, "hidden": (32, 32), "base": "stochastic"},  # the default base fits a dynamical model first
}


def _fast(name: str) -> dict:
    return FAST_PARAMS.get(name, {})


@pytest.fixture(scope="module")
def prepared():
    """simulate(n_obs=300, n_vars=30, seed=1), prepared with scVelo's defaults (no UMAP)."""
    adata = simulate(n_obs=300, n_vars=30, seed=1)
    prepare(adata, n_neighbors=15, compute_umap=False)
    return adata


@pytest.mark.parametrize("name", list(MODELS))
def test_model_contract(name, prepared, progress_log):
    adata = prepared.copy()
    before = {k: adata.layers[k].copy() for k in adata.layers}
    log, callback = progress_log
    model = get_model(name, seed=3, **_fast(name))
    assert model.get_params()["seed"] == 3
    result = model.fit(adata, progress=callback)

    assert isinstance(result, VelocityResult)
    assert result.model == name
    assert result.obs_names.equals(adata.obs_names)
    assert result.var_names.equals(adata.var_names)
    assert result.velocity.shape == (adata.n_obs, adata.n_vars)
    assert result.velocity_genes.dtype == bool
    assert result.velocity_genes.any(), "a model on clean simulated genes should trust some of them"
    assert np.isfinite(result.velocity[:, result.velocity_genes]).all()
    # fit leaves the AnnData alone
    assert set(adata.layers) == set(before)
    assert Key.layers.VELOCITY not in adata.layers
    for k, v in before.items():
        a, b = adata.layers[k], v
        a = a.toarray() if hasattr(a, "toarray") else a
        b = b.toarray() if hasattr(b, "toarray") else b
        np.testing.assert_array_equal(a, b)
    # progress: at least one report, monotone, ending at its total
    assert log, "fit must report progress"
    steps = [p.step / p.total for p in log if p.total]
    assert steps == sorted(steps)
    assert log[-1].step == log[-1].total

    # seeded fits are equal
    again = get_model(name, seed=3, **_fast(name)).fit(adata)
    np.testing.assert_array_equal(result.velocity, again.velocity)

    # to_adata writes scVelo's keys
    result.to_adata(adata)
    assert Key.layers.VELOCITY in adata.layers
    assert Key.var.VELOCITY_GENES in adata.var
    assert adata.uns[Key.uns.VELOCITY_PARAMS]["mode"] == name
    for col in result.gene_params.columns:
        assert col in adata.var


@pytest.mark.parametrize("name", list(MODELS))
def test_model_cancel(name, prepared):
    def cancel(_p):
        raise FitCancelled

    adata = prepared.copy()
    with pytest.raises(FitCancelled):
        get_model(name, **_fast(name)).fit(adata, progress=cancel)
    assert Key.layers.VELOCITY not in adata.layers


@pytest.mark.parametrize("name", list(MODELS))
def test_model_needs_moments(name):
    adata = simulate(n_obs=50, n_vars=5, seed=0)
    with pytest.raises(InputError, match="Ms"):
        get_model(name).fit(adata)


def test_unknown_model_lists_valid_names():
    with pytest.raises(KeyError, match="Valid options are: 'steady_state', 'stochastic', 'dynamical'"):
        get_model("velovi")


def test_result_checks_shapes(prepared):
    import pandas as pd

    with pytest.raises(ValueError, match="velocity has shape"):
        VelocityResult(
            model="x",
            params={},
            obs_names=prepared.obs_names,
            var_names=prepared.var_names,
            velocity=np.zeros((3, 3), dtype=np.float32),
            gene_params=pd.DataFrame(index=prepared.var_names),
            velocity_genes=np.ones(prepared.n_vars, dtype=bool),
        )
