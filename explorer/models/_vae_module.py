"""The network of VeloVAE (Gu, Blaauw & Welch, ICML 2022): encoder, ODE decoder and ELBO.

Kept apart from the AnnData-facing :class:`explorer.models.vae.VeloVAE`, as scvi-tools
keeps velovi's ``VELOVAE`` module apart from its ``VELOVI`` model: nothing here reads
AnnData, everything is a tensor of ``(n_cells, n_genes)`` or ``(n_genes,)``.

Generative model, per cell ``i`` and gene ``g``:

- a time ``t_i ~ N(t_prior_i, sd_prior_i^2)`` shared by all genes and, in the full
  model, a cell state ``c_i ~ N(0, c_prior_sd^2 I)`` (``dim_c`` dimensions; the paper's
  ``c_prior_sd`` is 1, the ``velovae`` package's 0.01);
- the full model's decoder ``rho_i = g(c_i)`` in ``[0, 1]^G`` scales each gene's
  transcription rate: ``du/dt = rho alpha - beta u``, ``ds/dt = beta u - gamma s``,
  on from the gene's onset ``t_on`` and, for a gene that has one, until its switch-off
  ``t_off`` (``switch_off``: the full model keeps it only for genes whose cells show
  repression; the ``velovae`` package's full model has none, repression being a low
  ``rho`` and stage 2's starts); the basic model has ``rho = 1`` (one rate per gene) and
  gene-specific switch-on ``t_on`` and switch-off ``t_off`` times;
- the ODE is solved analytically by :mod:`explorer.kinetics` in ``u / scaling`` units
  (scVelo's convention), so ``u_hat = scaling * u_ode`` and ``s_hat = s_ode``;
- ``Mu ~ N(u_hat, sigma_u^2)`` and ``Ms ~ N(s_hat, sigma_s^2)`` with per-gene noise.

Stage 1 solves from ``(0, 0)`` at ``t_on``; on CPU float32 tensors that solution, its
likelihood and the likelihood's gradient run as compiled loops
(:mod:`explorer.models._vae_kernels`, :meth:`VAEModule.log_likelihood_at`), elsewhere as the
torch code below. Stage 2 (the paper's second stage) starts
each cell from the mean prediction ``(u0, s0)`` at the mean time ``t0`` of training
cells just before it in time and close to it in cell state, so that lineages and
repression need no global switch curve; see :meth:`VAEModule.decode`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from explorer import kinetics

if TYPE_CHECKING:
    from collections.abc import Sequence

Variant = Literal["full", "basic"]

#: floors that keep rates, standard deviations and logs finite
_TINY = 1e-6
#: the package's learning rate of the ODE parameters is 8x the networks' (velovae 0.1.2)
ODE_LR_FACTOR = 8.0
#: on CPU float32 tensors, decode from ``(0, 0)`` and its likelihood through the compiled
#: kernels of :mod:`explorer.models._vae_kernels` (the tests also run the torch code, which
#: CUDA runs)
USE_KERNELS = True


@dataclass(frozen=True, slots=True)
class Posterior:
    """``q(t, c | u, s)`` of a batch: means and standard deviations, ``(n, 1)`` and ``(n, dim_c)``."""

    t_mean: torch.Tensor
    t_sd: torch.Tensor
    c_mean: torch.Tensor | None
    c_sd: torch.Tensor | None


@dataclass(frozen=True, slots=True)
class Decoded:
    """Predictions at the given times and states, each ``(n, G)``: count units, ODE velocities."""

    u: torch.Tensor
    s: torch.Tensor
    rho: torch.Tensor
    #: ``du/dt`` in count units of ``Mu`` and ``ds/dt`` in those of ``Ms``
    velocity_u: torch.Tensor
    velocity: torch.Tensor


@dataclass(frozen=True, slots=True)
class InitialState:
    """Stage 2's per-cell start: ``(n, G)`` ``u0`` (count units), ``s0`` and ``(n, 1)`` ``t0``."""

    u0: torch.Tensor
    s0: torch.Tensor
    t0: torch.Tensor


def _mlp(sizes: Sequence[int], dropout: float, *, leaky: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(n_in, n_out), nn.BatchNorm1d(n_out)]
        layers.append(nn.LeakyReLU() if leaky else nn.ReLU())
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class _FusedLogLikelihood(torch.autograd.Function):
    """:meth:`VAEModule.log_likelihood` of :meth:`VAEModule.decode` from ``(0, 0)``, compiled (CPU).

    Forward and backward are the loops of :mod:`explorer.models._vae_kernels`; the inputs
    are each gene's curve constants (onset, switch, rates, switch state, scaling, noise
    weights) and each cell's time and ``rho``. Returns ``(n,)`` without the Gaussian's
    constant.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        t: torch.Tensor,
        rho: torch.Tensor,
        u: torch.Tensor,
        s: torch.Tensor,
        *genes: torch.Tensor,
    ) -> torch.Tensor:
        from explorer.models import _vae_kernels

        args = (_numpy(t.reshape(-1)), _numpy(rho), _numpy(u), _numpy(s), _kernel_constants(genes))
        ctx.args = args
        return torch.from_numpy(_vae_kernels.loglik(*args).astype(np.float32)).to(t.device)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        from explorer.models import _vae_kernels

        g_t, g_rho, g_genes = _vae_kernels.loglik_grad(_numpy(grad).astype(np.float64), *ctx.args)
        g_genes = torch.from_numpy(g_genes.astype(np.float32))
        # the genes' inputs: t_start, t_off, alpha, beta, gamma, u0, s0, scaling, then the
        # noise weights (constants)
        return (
            torch.from_numpy(g_t.astype(np.float32))[:, None],
            torch.from_numpy(g_rho),
            None,
            None,
            *g_genes.unbind(0),
            None,
            None,
        )


def _numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().contiguous().numpy()


def _kernel_constants(genes: tuple[torch.Tensor, ...]) -> np.ndarray:
    """The compiled kernels' per-gene constants from :meth:`VAEModule._gene_inputs`."""
    from explorer.models import _vae_kernels

    return _vae_kernels.gene_constants(*(_numpy(x) for x in genes))


class VAEModule(nn.Module):
    """Encoder ``q(t, c | u, s)``, ODE decoder and ELBO of VeloVAE.

    Parameters
    ----------
    n_input
        Genes the encoder reads (its input is their standardised ``(u, s)``, ``2 n_input``).
    n_genes
        Genes whose kinetics are fitted (the decoder's output).
    variant
        ``"full"``: time and cell state, ``rho = g(c)``; ``"basic"``: time only, ``rho = 1``.
    dim_c
        Dimensions of the cell state (the paper: 5).
    hidden
        Encoder hidden layers (the paper: 500, 250); the decoder is its mirror.
    dropout
        Dropout after every hidden layer of the decoder (and of the encoder, unless
        ``encoder_dropout`` is given).
    init
        Initial per-gene ``alpha, beta, gamma, scaling, t_on, t_off, sigma_u, sigma_s``
        (``(n_genes,)`` tensors, by those names), from the steady-state fit.
    t_init
        Initial bias of the time head (the mean initial time).
    switch_off
        Whether each gene has a switch-off time ``t_off`` after which it is repressed
        (the basic model's on/off kinetics), for all genes or per gene (a ``(G,)`` bool
        tensor). Without it (as the ``velovae`` package's full ``VAE``) a gene is induced
        from its onset on, at rate ``rho alpha``: a gene that is down in some cells is a
        low ``rho`` there, not a switch that every lineage passes at one time; its
        ``t_off`` is then unused (``inf``).
    c_prior_sd
        Standard deviation of the cell state's prior ``N(0, c_prior_sd^2 I)``.
    encoder_dropout
        Dropout after every hidden layer of the encoder; ``None``: ``dropout``.
    """

    def __init__(
        self,
        n_input: int,
        n_genes: int,
        *,
        variant: Variant,
        dim_c: int,
        hidden: tuple[int, int],
        dropout: float,
        init: dict[str, torch.Tensor],
        t_init: float,
        switch_off: bool | torch.Tensor = True,
        c_prior_sd: float = 1.0,
        encoder_dropout: float | None = None,
    ) -> None:
        super().__init__()
        self.variant = variant
        #: standard deviation of the cell state's prior N(0, c_prior_sd^2 I)
        self.c_prior_sd = float(c_prior_sd)
        switches = torch.as_tensor(switch_off, dtype=torch.bool).expand(n_genes).clone()
        self.switch_off = bool(switches.any())
        #: (G,) whether each gene has a switch-off time
        self.register_buffer("switches", switches)
        self.dim_c = dim_c if variant == "full" else 0
        enc_dropout = dropout if encoder_dropout is None else encoder_dropout
        self.encoder = _mlp([2 * n_input, *hidden], enc_dropout, leaky=False)
        self.t_head = nn.Linear(hidden[-1], 2)
        with torch.no_grad():
            self.t_head.bias.copy_(torch.tensor([t_init, -1.0]))
        if self.dim_c:
            self.c_head = nn.Linear(hidden[-1], 2 * self.dim_c)
            self.decoder = _mlp([self.dim_c, *reversed(hidden)], dropout, leaky=True)
            self.rho_head = nn.Linear(hidden[0], n_genes)
            with torch.no_grad():
                # start near rho = 1 (the basic model): sigmoid(3) = 0.95
                self.rho_head.bias.fill_(3.0)
        # ODE parameters, log-rates so that they stay positive
        self.log_alpha = nn.Parameter(init["alpha"].clamp(min=_TINY).log())
        self.log_beta = nn.Parameter(init["beta"].clamp(min=_TINY).log())
        self.log_gamma = nn.Parameter(init["gamma"].clamp(min=_TINY).log())
        self.log_scaling = nn.Parameter(init["scaling"].clamp(min=_TINY).log())
        self.t_on = nn.Parameter(init["t_on"].clone())
        if self.switch_off:
            self.t_off = nn.Parameter(init["t_off"].clone())
        else:
            # never: the genes stay induced (a buffer, so the state dict keeps its name)
            self.register_buffer("t_off", torch.full_like(init["t_off"], math.inf))
        # per-gene noise: fixed within a stage, re-estimated between stages (as velovae)
        self.register_buffer("sigma_u", init["sigma_u"].clone())
        self.register_buffer("sigma_s", init["sigma_s"].clone())

    # --------------------------------------------------------------------------- groups

    def rate_parameters(self) -> list[nn.Parameter]:
        """The per-gene log-rates (``alpha``, ``beta``, ``gamma``, the scaling): no switch times."""
        return [self.log_alpha, self.log_beta, self.log_gamma, self.log_scaling]

    def ode_parameters(self) -> list[nn.Parameter]:
        """The per-gene kinetic parameters (trained with the ODE learning rate)."""
        params = [*self.rate_parameters(), self.t_on]
        return [*params, self.t_off] if self.switch_off else params

    def network_parameters(self) -> list[nn.Parameter]:
        """Encoder and decoder weights."""
        ode = {id(p) for p in self.ode_parameters()}
        return [p for p in self.parameters() if id(p) not in ode]

    def curve(
        self, t: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, gamma: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each gene's ``(u, s)`` from ``(0, 0)`` at times ``t`` (ODE units), at rate ``alpha``.

        Off until ``t_on``, then induced; with ``switch_off``, repressed after ``t_off``
        (:func:`explorer.kinetics.trajectory`).
        """
        if bool(self.switches.all()):
            return kinetics.trajectory(t, self.t_off, alpha, beta, gamma, t_on=self.t_on, xp=torch)
        if self.switch_off:
            # a switch after every time and onset asked for is no switch: one call for all genes
            never = torch.maximum(t.detach().max(), self.t_on.detach().max()) + 1
            t_off = torch.where(self.switches, self.t_off, never)
            return kinetics.trajectory(t, t_off, alpha, beta, gamma, t_on=self.t_on, xp=torch)
        return kinetics.solution((t - self.t_on).clamp(min=0), 0.0, 0.0, alpha, beta, gamma, xp=torch)

    def on(self, t: torch.Tensor) -> torch.Tensor:
        """Where the gene is transcribed at ``t``: after its onset (and before its switch-off)."""
        on = t >= self.t_on
        return on & ((t < self.t_off) | ~self.switches) if self.switch_off else on

    def switch_times(self) -> torch.Tensor:
        """``(G,)`` each gene's switch-off time, ``inf`` for a gene that has none."""
        t_off = self.t_off.detach()
        return torch.where(self.switches, t_off, torch.full_like(t_off, math.inf))

    def rates(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(alpha, beta, gamma, scaling)``, each ``(G,)``; ``beta`` in ODE (``u / scaling``) units."""
        return self.log_alpha.exp(), self.log_beta.exp(), self.log_gamma.exp(), self.log_scaling.exp()

    # --------------------------------------------------------------------------- encoder

    def encode(self, x: torch.Tensor) -> Posterior:
        """``q(t, c | x)`` of ``x`` = standardised ``(u, s)``, ``(n, 2 n_input)``."""
        h = self.encoder(x)
        t = self.t_head(h)
        t_sd = F.softplus(t[:, 1:2]) + 1e-3
        if not self.dim_c:
            return Posterior(t[:, :1], t_sd, None, None)
        c = self.c_head(h)
        c_sd = F.softplus(c[:, self.dim_c :]) + 1e-4
        return Posterior(t[:, :1], t_sd, c[:, : self.dim_c], c_sd)

    # --------------------------------------------------------------------------- decoder

    def rho(self, c: torch.Tensor | None, n: int) -> torch.Tensor:
        """``(n, G)`` relative transcription rate: ``g(c)`` (full) or 1 (basic)."""
        if c is None or not self.dim_c:
            return torch.ones(n, self.log_alpha.shape[0], device=self.log_alpha.device)
        return torch.sigmoid(self.rho_head(self.decoder(c)))

    def decode(
        self, t: torch.Tensor, c: torch.Tensor | None, x0: InitialState | None = None, *, rho: torch.Tensor | None = None
    ) -> Decoded:
        """Solve every gene's ODE at each cell's time ``t`` ``(n, 1)`` and state ``c``.

        ``rho``, when given, is :meth:`rho` of ``c`` already computed (a caller that
        decodes the same cells at many times needs the decoder network once).

        Without ``x0`` (stage 1) each gene is off until ``t_on``, induced with rate
        ``rho alpha`` until ``t_off`` and repressed after it, from ``(0, 0)``
        (:func:`explorer.kinetics.trajectory`). With ``x0`` (stage 2) each cell evolves
        from its own ``(u0, s0)`` at ``t0`` for ``max(t - t0, 0)`` with the rate in
        force at ``t`` (``rho alpha`` between ``t_on`` and ``t_off``, else 0). Without
        ``x0`` and without gradients, on CPU float32 tensors, the compiled
        :func:`explorer.models._vae_kernels.predict` gives the same numbers.
        """
        if rho is None:
            rho = self.rho(c, t.shape[0])
        if x0 is None and not torch.is_grad_enabled() and self._compiled_for(t):
            from explorer.models import _vae_kernels

            k = _kernel_constants(self._gene_inputs(t))
            out = torch.from_numpy(_vae_kernels.predict(_numpy(t.reshape(-1)), _numpy(rho), k))
            return Decoded(out[0], out[1], rho, out[2], out[3])
        alpha, beta, gamma, scaling = self.rates()
        a = rho * alpha
        if x0 is None:
            # from (0, 0) the solution is linear in the transcription rate, so it is the
            # gene's curve at rate alpha times rho: the switch state is then per gene, not
            # per cell and gene (on the pancreas this cut the ODE's share of an epoch)
            u, s = self.curve(t, alpha, beta, gamma)
            u, s = rho * u, rho * s
            # the rate in force at t, for the velocity
            on = self.on(t).to(a.dtype)
        else:
            on = self.on(t).to(a.dtype)
            tau = (t - x0.t0).clamp(min=0)
            u0 = x0.u0 / scaling
            u = kinetics.unspliced(tau, u0, a * on, beta, xp=torch)
            s = kinetics.spliced(tau, x0.s0, u0, a * on, beta, gamma, xp=torch)
        u = u.clamp(min=0)
        s = s.clamp(min=0)
        vu = (a * on - beta * u) * scaling
        vs = kinetics.velocity(u, s, beta, gamma)
        return Decoded(u * scaling, s, rho, vu, vs)

    # --------------------------------------------------------------------------- loss

    def log_likelihood(self, u: torch.Tensor, s: torch.Tensor, dec: Decoded) -> torch.Tensor:
        """``(n,)`` Gaussian log-likelihood of ``(u, s)`` summed over genes."""
        ru = (u - dec.u) / self.sigma_u
        rs = (s - dec.s) / self.sigma_s
        return -0.5 * (ru * ru + rs * rs).sum(1) - self._log_normaliser(u.shape[1])

    def _log_normaliser(self, n_genes: int) -> torch.Tensor:
        return torch.log(self.sigma_u).sum() + torch.log(self.sigma_s).sum() + n_genes * math.log(2 * math.pi)

    def log_likelihood_at(self, u: torch.Tensor, s: torch.Tensor, t: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
        """``(n,)`` :meth:`log_likelihood` of :meth:`decode` at times ``t`` ``(n, 1)`` from ``(0, 0)``, given ``rho``.

        On the CPU (float32, :data:`USE_KERNELS`) one compiled loop computes it and another its
        gradient (:mod:`explorer.models._vae_kernels`, the same numbers to float32
        rounding, and closer to float64's where ``beta ~ gamma``); elsewhere the torch
        code of :meth:`decode`.
        """
        if not self._compiled_for(u):
            return self.log_likelihood(u, s, self.decode(t, None, rho=rho))
        ll = _FusedLogLikelihood.apply(t, rho.contiguous(), u, s, *self._gene_inputs(t))
        return ll - self._log_normaliser(u.shape[1])

    @staticmethod
    def _compiled_for(x: torch.Tensor) -> bool:
        return USE_KERNELS and x.device.type == "cpu" and x.dtype == torch.float32

    def _gene_inputs(self, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The compiled kernels' per-gene inputs at cell times ``t``: onset, switch, rates,
        switch state, scaling and noise weights (:func:`explorer.models._vae_kernels.gene_constants`)."""
        alpha, beta, gamma, scaling = self.rates()
        # a switch after every time and onset asked for is no switch, as in curve
        never = torch.maximum(t.detach().max(), self.t_on.detach().max()) + 1
        t_off = torch.where(self.switches, self.t_off, never)
        dur = (t_off - self.t_on).clamp(min=0)
        u0, s0 = kinetics.switch_state(dur, alpha, beta, gamma, xp=torch)
        return (t_off - dur, t_off, alpha, beta, gamma, u0, s0, scaling, self.sigma_u**-2, self.sigma_s**-2)

    def grid_log_likelihood(
        self, u: torch.Tensor, s: torch.Tensor, rho: torch.Tensor, grid: torch.Tensor
    ) -> torch.Tensor:
        """``(n, len(grid))`` :meth:`log_likelihood` of each cell at every time of ``grid``, from ``(0, 0)``.

        The same numbers as :meth:`decode` (without ``x0``) at each grid time followed by
        :meth:`log_likelihood`, up to rounding: the prediction is ``rho`` times the gene's
        curve at rate ``alpha``, so with ``U = curve(grid)`` (``(len(grid), G)``, per gene)
        ``sum_g (u - rho U)^2 / sigma^2 = sum u^2 / sigma^2 - 2 (u rho / sigma^2) U^T
        + (rho^2 / sigma^2) (U^2)^T``: two matrix products per layer instead of a decode
        of every cell and gene at every grid time. In float64, so that the expansion's
        cancellation stays far below the differences between grid times.
        """
        alpha, beta, gamma, scaling = self.rates()
        times = grid.reshape(-1, 1)
        cu, cs = self.curve(times, alpha, beta, gamma)
        cu = (cu.clamp(min=0) * scaling).double()
        cs = cs.clamp(min=0).double()
        rho = rho.double()
        total = torch.zeros(u.shape[0], len(grid), dtype=torch.float64, device=u.device)
        for x, curve, sigma in ((u, cu, self.sigma_u), (s, cs, self.sigma_s)):
            w = 1 / sigma.double() ** 2
            x = x.double()
            total += (x * x * w).sum(1, keepdim=True)
            total -= 2 * (x * rho * w) @ curve.T
            total += (rho * rho * w) @ (curve * curve).T
        const = torch.log(self.sigma_u).sum() + torch.log(self.sigma_s).sum()
        return (-0.5 * total - const - u.shape[1] * math.log(2 * math.pi)).to(u.dtype)

    def loss(
        self,
        x: torch.Tensor,
        u: torch.Tensor,
        s: torch.Tensor,
        t_prior: tuple[torch.Tensor, torch.Tensor],
        *,
        x0: InitialState | None = None,
        sample: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Negative ELBO of the batch, and each cell's ELBO ``(n,)`` (detached).

        ``t_prior`` is the ``(mean, sd)`` of the time prior, each ``(n, 1)``. With
        ``sample``, one reparameterised draw of ``(t, c)``; else the posterior means.
        """
        q = self.encode(x)
        t = q.t_mean + q.t_sd * torch.randn_like(q.t_sd) if sample else q.t_mean
        c = None
        if q.c_mean is not None:
            c = q.c_mean + q.c_sd * torch.randn_like(q.c_sd) if sample else q.c_mean
        if x0 is None:
            ll = self.log_likelihood_at(u, s, t, self.rho(c, t.shape[0]))
        else:
            ll = self.log_likelihood(u, s, self.decode(t, c, x0))
        mu0, sd0 = t_prior
        kl_t = (torch.log(sd0 / q.t_sd) + (q.t_sd**2 + (q.t_mean - mu0) ** 2) / (2 * sd0**2) - 0.5).sum(1)
        kl = kl_t
        if q.c_mean is not None:
            kl = kl + self.kl_state(q)
        elbo = ll - kl
        return -elbo.mean(), elbo.detach()

    def kl_state(self, q: Posterior) -> torch.Tensor:
        """``(n,)`` KL divergence of ``q(c)`` from the state prior ``N(0, c_prior_sd^2 I)``."""
        v = self.c_prior_sd**2
        return 0.5 * ((q.c_sd**2 + q.c_mean**2) / v - 1 - 2 * torch.log(q.c_sd) + math.log(v)).sum(1)

    def state_loss(
        self, x: torch.Tensor, u: torch.Tensor, s: torch.Tensor, t: torch.Tensor, *, sample: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Negative ELBO over the cell state alone, each cell's time ``t`` ``(n, 1)`` given.

        The ELBO of :meth:`loss` without the time's sample and KL term: what the state
        stage maximises once the time is fixed (the full model only).
        """
        q = self.encode(x)
        c = q.c_mean + q.c_sd * torch.randn_like(q.c_sd) if sample else q.c_mean
        elbo = self.log_likelihood_at(u, s, t, self.rho(c, t.shape[0])) - self.kl_state(q)
        return -elbo.mean(), elbo.detach()
