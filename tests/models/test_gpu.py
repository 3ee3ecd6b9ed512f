"""Every torch model on CUDA gives the CPU's fit (marker ``gpu``; skipped without CUDA).

The dynamical model's EM runs in float32 on either device, so the two fits differ by
rounding and by the order of floating-point reductions only: the same genes, the same
rates to a few per cent, the same latent time. The networks (VeloVAE, DeepVelo, the
vector field) draw other random numbers on CUDA and train other minibatch orders, so
there the CUDA fit is held to the simulator's truth (or the field to its input) as
closely as the CPU fit in the same test, not to the CPU fit's numbers.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.fixture(scope="module")
def prepared():
    from explorer.pipeline import prepare
    from explorer.data.simulate import simulate

    adata = simulate(n_obs=2000, n_vars=150, seed=3, branches=2)
    prepare(adata, seed=0)
    return adata


@pytest.fixture(scope="module")
def fits(prepared):
    from explorer.models import get_model

    cpu = get_model("dynamical", seed=0, device="cpu").fit(prepared)
    cuda = get_model("dynamical", seed=0, device="cuda").fit(prepared)
    return cpu, cuda


def test_cuda_fit_matches_cpu(fits):
    cpu, cuda = fits
    assert list(cpu.var_names) == list(cuda.var_names)
    fitted = np.isfinite(cpu.gene_params["fit_alpha"].to_numpy())
    assert fitted.sum() > 50
    assert np.array_equal(fitted, np.isfinite(cuda.gene_params["fit_alpha"].to_numpy()))
    for column in ("fit_alpha", "fit_beta", "fit_gamma", "fit_t_"):
        a = cpu.gene_params[column].to_numpy()[fitted]
        b = cuda.gene_params[column].to_numpy()[fitted]
        rel = np.abs(a - b) / np.maximum(np.abs(a), 1e-6)
        # rounding differences can flip a few genes between near-equal EM optima
        assert np.median(rel) < 1e-2, column
        assert np.mean(rel < 0.1) > 0.9, column
    rho = spearmanr(cpu.latent_time, cuda.latent_time).statistic
    assert rho > 0.99


def test_cuda_latent_time_follows_truth(prepared, fits):
    _, cuda = fits
    truth = prepared.obs["true_t"].to_numpy()
    assert spearmanr(cuda.latent_time, truth).statistic > 0.9
    v = np.asarray(cuda.velocity)
    true_v = np.asarray(prepared.layers["true_velocity"])
    genes = np.isfinite(v).all(axis=0)
    agree = np.sign(v[:, genes]) == np.sign(true_v[:, genes])
    assert agree.mean() > 0.7


# ------------------------------------------------------------------ the networks on CUDA


@pytest.fixture(scope="module")
def branching():
    """Two lineages with lineage programmes and lineage-specific degradation (as tests/models/test_vae.py)."""
    from explorer.data.simulate import simulate
    from explorer.pipeline import prepare

    adata = simulate(n_obs=600, n_vars=60, seed=1, branches=2, kinds={"two_regimes": 0.3})
    prepare(adata, n_neighbors=15, compute_umap=False)
    return adata


def test_cuda_velovae_times_and_reconstructs_as_the_cpu(branching):
    from explorer.keys import Key
    from explorer.models.vae import VeloVAE, time_calibration

    truth = branching.obs[Key.obs.TRUE_T].to_numpy()
    fits = {}
    for device in ("cpu", "cuda"):
        model = VeloVAE(seed=0, device=device)
        adata = branching.copy()
        result = model.fit(adata)
        result.to_adata(adata)
        fits[device] = model, result, adata
    cpu_model, cpu, _ = fits["cpu"]
    cuda_model, cuda, written = fits["cuda"]
    # the CPU fit orders these cells at 0.998 (tests/models/test_vae.py)
    rho_cpu = spearmanr(cpu.latent_time, truth).statistic
    rho_cuda = spearmanr(cuda.latent_time, truth).statistic
    assert rho_cuda > 0.95 and rho_cuda > rho_cpu - 0.02, (rho_cuda, rho_cpu)
    assert cuda_model.metrics_["mse_test"] < 1.5 * cpu_model.metrics_["mse_test"]
    for result in (cpu, cuda):
        assert np.isfinite(result.velocity).all()
        assert np.isfinite(result.uncertainty).all() and (result.uncertainty >= 0).all()
    sd = written.obs[Key.obs.LATENT_TIME_STD].to_numpy()
    assert np.isfinite(sd).all() and (sd > 0).all()
    coverage = time_calibration(truth, cuda.latent_time, sd)["coverage"]
    assert 0.5 < coverage <= 1.0, coverage


def test_cuda_deepvelo_gets_both_regimes_signs():
    from explorer.data.simulate import simulate
    from explorer.models import get_model
    from explorer.pipeline import prepare
    from tests.models.test_gcn import REGIMES, _sign_accuracy

    adata = simulate(**REGIMES, seed=0)
    prepare(adata, n_neighbors=30, compute_umap=False)
    for device in ("cpu", "cuda"):
        velocity = get_model("deepvelo", genes="all", seed=0, device=device).fit(adata).velocity
        # the CPU: about 0.9 in both regimes (tests/models/test_gcn.py); one rate per gene: below 0.4 in B
        assert _sign_accuracy(adata, velocity, 0) > 0.85, device
        assert _sign_accuracy(adata, velocity, 1) > 0.85, device


def test_cuda_vector_field_matches_its_input_velocity():
    from explorer.data.samples import load_sample
    from explorer.keys import Key
    from explorer.models.vector_field import VectorField, load_field
    from tests.models.test_vector_field import _cos, _in_state

    for device in ("cpu", "cuda"):
        adata = load_sample("default").copy()
        result = VectorField(base="stochastic", epochs=100, seed=0, device=device).fit(adata)
        given = adata.layers[Key.layers.VELOCITY].copy()
        result.to_adata(adata)
        cos = _cos(adata.obsm[Key.obsm.VF_VELOCITY], _in_state(adata, load_field(adata), given))
        # the CPU: above 0.9 (tests/models/test_vector_field.py)
        assert np.mean(cos) > 0.9, (device, np.mean(cos))
