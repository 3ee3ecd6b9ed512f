"""The dynamical model on CUDA gives the CPU's fit (marker ``gpu``; skipped without CUDA).

The EM runs in float32 on either device, so the two fits differ by rounding and by the
order of floating-point reductions only: the same genes, the same rates to a few per
cent, the same latent time. Both are also checked against the simulator's true time.
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
