"""VeloVAE's compiled CPU kernels (explorer.models._vae_kernels) against the torch code they replace."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from explorer.data.simulate import simulate
from explorer.models import _vae_kernels, _vae_module
from explorer.models._vae_module import VAEModule
from explorer.models.vae import VeloVAE
from explorer.pipeline import prepare

N_GENES = 120


def _module(switch_off, *, gamma_offset=1e-5):
    """A small full model with hand-set kinetics that reach every branch of the kernels:

    genes induced and repressed, onsets after the switch, genes without a switch (per
    ``switch_off``), and rates 20 genes apart by ``gamma_offset`` (near-equal ``beta``
    and ``gamma``, where the cross term's series is used).
    """
    g = torch.Generator().manual_seed(0)
    r = lambda lo, hi: lo + (hi - lo) * torch.rand(N_GENES, generator=g)  # noqa: E731
    init = {
        "alpha": r(0.5, 3.5), "beta": r(0.5, 1.5), "gamma": r(0.2, 1.2), "scaling": r(0.5, 1.5),
        "t_on": r(0, 3), "t_off": r(5, 15), "sigma_u": r(0.5, 1.5), "sigma_s": r(0.5, 1.5),
    }  # fmt: skip
    init["gamma"][:20] = init["beta"][:20] + gamma_offset
    init["t_on"][20:30] = 18.0  # after the switch: never induced
    if switch_off == "partial":
        switch_off = torch.rand(N_GENES, generator=g) < 0.5
    torch.manual_seed(0)
    module = VAEModule(
        N_GENES, N_GENES, variant="full", dim_c=5, hidden=(40, 20), dropout=0.0, init=init, t_init=5.0,
        switch_off=switch_off, c_prior_sd=0.01,
    )  # fmt: skip
    return module.eval()


def _cells(n=150):
    g = torch.Generator().manual_seed(1)
    t = 20 * torch.rand(n, 1, generator=g)
    rho = torch.rand(n, N_GENES, generator=g)
    u = 3 * torch.rand(n, N_GENES, generator=g)
    s = 3 * torch.rand(n, N_GENES, generator=g)
    return t, rho, u, s


def _likelihood_and_gradients(module, t, rho, u, s, dtype):
    """The cells' log-likelihood and its gradient by t, rho and every kinetic parameter."""
    t = t.to(dtype).clone().requires_grad_()
    rho = rho.to(dtype).clone().requires_grad_()
    params = [t, rho, *module.ode_parameters()]
    ll = module.log_likelihood_at(u.to(dtype), s.to(dtype), t, rho)
    grads = torch.autograd.grad(ll.sum(), params)
    return [x.detach().double() for x in (ll, *grads)]


@pytest.mark.parametrize("switch_off", ["partial", True, False])
def test_compiled_likelihood_and_gradient_match_float64(switch_off, monkeypatch):
    """The compiled log-likelihood and its analytic gradient against torch's autograd in float64.

    Measured: every quantity within 2e-6 of float64 (relative to its largest value); the
    torch code in float32 is 1e-4 off on beta's gradient where beta ~ gamma (autograd
    through the cross term's difference quotient), so the kernels are also the more exact.
    """
    module = _module(switch_off)
    t, rho, u, s = _cells()
    reference = _likelihood_and_gradients(copy.deepcopy(module).double(), t, rho, u, s, torch.float64)
    monkeypatch.setattr(_vae_module, "USE_KERNELS", False)
    torch32 = _likelihood_and_gradients(module, t, rho, u, s, torch.float32)
    monkeypatch.setattr(_vae_module, "USE_KERNELS", True)
    compiled = _likelihood_and_gradients(module, t, rho, u, s, torch.float32)
    names = ["ll", "t", "rho", "log_alpha", "log_beta", "log_gamma", "log_scaling", "t_on", "t_off"]
    worst = {"compiled": 0.0, "torch": 0.0}
    for name, ref, a, b in zip(names, reference, compiled, torch32, strict=False):
        scale = float(ref.abs().max())
        assert scale > 0, name
        err = float((a - ref).abs().max()) / scale
        assert err < 2e-5, (name, err)
        worst["compiled"] = max(worst["compiled"], err)
        worst["torch"] = max(worst["torch"], float((b - ref).abs().max()) / scale)
    assert worst["compiled"] < worst["torch"]


def test_compiled_gradient_at_equal_rates_is_the_limit():
    """At beta == gamma the compiled gradient is the limit of nearby rates' (the torch code's
    clamp of |gamma - beta| drops that term there)."""
    t, rho, u, s = _cells()
    equal = _likelihood_and_gradients(_module(True, gamma_offset=0.0), t, rho, u, s, torch.float32)
    near = copy.deepcopy(_module(True, gamma_offset=1e-6)).double()
    limit = _likelihood_and_gradients(near, t, rho, u, s, torch.float64)
    for a, b in zip(equal, limit, strict=True):
        assert float((a - b).abs().max()) <= 1e-4 * float(b.abs().max())


@pytest.mark.parametrize("switch_off", ["partial", False])
def test_compiled_decode_matches_the_torch_code(switch_off, monkeypatch):
    """Without gradients decode's predictions and velocities come from the compiled kernel: the same numbers."""
    module = _module(switch_off)
    t, _, _, _ = _cells()
    c = torch.randn(len(t), 5, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        compiled = module.decode(t, c)
        monkeypatch.setattr(_vae_module, "USE_KERNELS", False)
        reference = module.decode(t, c)
    for field in ("u", "s", "velocity_u", "velocity"):
        a, b = getattr(compiled, field), getattr(reference, field)
        assert float((a - b).abs().max()) <= 1e-5 * float(b.abs().max()), field
    assert torch.equal(compiled.rho, reference.rho)


def test_kernel_sums_do_not_depend_on_the_thread_count():
    """The per-gene gradients are summed over a fixed number of cell chunks: the same bits on 1 or 2 threads."""
    import numba

    module = _module("partial")
    t, rho, u, s = _cells()
    k = _vae_module._kernel_constants(module._gene_inputs(t))
    args = (np.ones(len(t)), t.numpy().ravel(), rho.numpy(), u.numpy(), s.numpy(), k)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = _vae_kernels.loglik_grad(*args)
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        two = _vae_kernels.loglik_grad(*args)
    finally:
        numba.set_num_threads(before)
    for a, b in zip(one, two, strict=True):
        np.testing.assert_array_equal(a, b)


def test_torch_code_still_fits(monkeypatch):
    """The torch path (what CUDA runs) trains as well on the CPU: a short fit raises the held-out ELBO."""
    adata = simulate(n_obs=200, n_vars=20, seed=0)
    prepare(adata, n_neighbors=15, compute_umap=False)
    monkeypatch.setattr(_vae_module, "USE_KERNELS", False)
    model = VeloVAE(seed=0, n_warmup_epochs=0, max_epochs=5, max_epochs_stage2=0, n_samples=2, device="cpu")
    model.fit(adata)
    elbo = model.history_["stage1"]
    assert elbo[-1] > elbo[0] + 1
