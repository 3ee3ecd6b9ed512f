"""VeloVAE: a variational mixture of ODEs with one time per cell and a cell state.

Gu, Blaauw & Welch (ICML 2022), "Variational mixtures of ODEs for inferring cellular
gene expression dynamics". Every cell has one time ``t`` shared by all genes and, in the
full model, a cell state ``c`` whose decoder ``rho = g(c)`` scales each gene's
transcription rate, so lineages can run the same genes at different rates. The
posterior over ``(t, c)`` gives each cell's time with an interval and a velocity
uncertainty from posterior samples. The network is in :mod:`explorer.models._vae_module`
(as scvi-tools keeps velovi's module apart from its model); this class builds tensors
from the AnnData, trains and extracts results.

Both variants keep a switch-on and a switch-off time for every gene by default
(``switch_off=True``). ``switch_off="per_gene"`` keeps a gene's switch-off only where its
cells show repression (a gene one lineage does not express is then a low ``rho`` there,
not a switch-off that every lineage passes at one time), and ``False`` none, as the
``velovae`` package's full model; neither is the default, as an always-induced gene has
positive velocity in every cell, the wrong sign for a gene whose expression falls.

Training follows the paper: initial rates from the steady-state fit and times from
scanpy's diffusion pseudotime rooted where the steady-state fit's latent time starts (or
from capture times, ``time_key=``), Adam with learning rate 2e-4 (ODE parameters 8x, as the
``velovae`` package), minibatches of 128 on a seeded 70 % of the cells, the per-gene
noise re-estimated every 5 epochs, stopping when the held-out ELBO stops improving.
Beyond the paper, stage 1 holds the cell state under a tight prior (``time_c_prior_sd``,
0.01 as the ``velovae`` package) so that the time, not ``rho``, explains the cells' order;
after each cell's time is read from its grid posterior (below), a state stage re-learns
the state, ``rho`` and the rates under the paper's ``c ~ N(0, I)`` with the time fixed;
then the kinetics and the ``rho`` head are refitted at each cell's
refined time and state (``max_epochs_polish``); then the paper's second stage: each cell
starts from the cells just before it in time and close in cell state, and the ODE
parameters are fine-tuned with time and state fixed.

Beyond the paper, each cell's reported time is not the encoder's amortised mean but the
mean of its own time posterior given its cell state and the fitted ODE, evaluated on a
grid (on a two-lineage simulation this raised the latent time's Spearman correlation
with the truth from 0.86 to 0.99); its SD is that posterior's, with the likelihood
tempered by ``2 G / n_eff`` because the genes' residuals are correlated (``n_eff``: the
participation ratio of the residual covariance). Nominal 90 % intervals then cover 90-99 %
of the true times on seven two-lineage and scVelo simulations, read through a cross-fitted
monotone map of the model's clock (:func:`time_calibration`; 65-66 % through a cubic),
but the SD does not rank cells by their error (figures of 2026-12-02; where lineages'
rates differ they cover 57-78 %, measured since). The initial time is DPT unless it
disagrees with the steady-state fit's latent time, which was the default until 2026-12-03
(``initial_time="steady_state"``). A residual-bootstrap temperature
(``time_temperature="bootstrap"``) was measured and is not the default. Another option,
``n_starts=2``, pools a fit from each initial time (:func:`ensemble_time`): where the
two clocks disagree the pooled SD widens. With stage 1 under ``N(0, I)`` its SD ranked
cells by their error with intervals covering 82-95 % on four of six simulations, but not
on the other two (an SD that ranked at -0.04; a bias both starts share, covered at 47 %),
and with the default state stage the starts agree more (-0.18 on the tests' simulation),
so it is not the default either. What is (``time_sd="two_starts"``, since 2026-12-05): a
second start from the other initial time, fitted only until its time is read, whose place for
each cell, on this fit's clock, widens that cell's SD (:func:`start_shift`); the time stays
this fit's. On twelve two-lineage simulations its intervals cover within 10 points of
nominal on ten (the posterior's alone on two), and its SD ranks the cells by their error where
a lineage's cells share one time error. See README, "VeloVAE".
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from statistics import NormalDist
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import pandas as pd
from scipy import sparse

from explorer import kinetics
from explorer._types import InputError, model_param, report
from explorer.graph import latent_time as lt_mod
from explorer.graph.transition import neighbors_for_graph
from explorer.keys import Key
from explorer.models.base import Hyperparameters, VelocityResult, require_layers
from explorer.models.dynamical import (
    _LARGE_GRAPH_CELLS,
    _LARGE_GRAPH_POWER_STEPS,
    _graph_recursion,
    _import_torch,
    _resolve_device,
)
from explorer.models.metrics import gene_blocks, gene_likelihood, latent_time_spearman, reconstruction_error
from explorer.models.steady_state import SteadyState, genes_to_fit

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    import torch
    from anndata import AnnData
    from numpy.typing import ArrayLike

    from explorer._types import ProgressCallback
    from explorer.models._vae_module import InitialState, VAEModule

logger = logging.getLogger(__name__)

Variant = Literal["full", "basic"]
GeneSelection = Literal["all", "velocity_genes"]
InitialTime = Literal["steady_state", "dpt"]
TimeTemperature = Literal["bootstrap", "participation"]
TimePosterior = Literal["stage1", "final"]
TimeSD = Literal["two_starts", "posterior"]
SwitchOff = Literal["per_gene"]
Device = Literal["auto", "cpu", "cuda"]

#: floor on per-gene noise, as a share of the gene's standard deviation
_SIGMA_FLOOR = 0.05
#: switch_off="per_gene": a gene keeps its switch-off when the on/off curve's squared
#: distance to the cells is below this share of the always-induced curve's
_SWITCH_GAIN = 0.9
#: cells per chunk when the whole data set goes through the network (bounds memory)
_CHUNK = 2048
#: the time posterior's parts kept in ``time_posterior_`` (the grid's, then the encoder's)
_TIME_PARTS = ("t_mean", "t_sd", "t_mean_encoder", "t_sd_encoder")
#: a second start's initial time: the other one
_OTHER_START = {"steady_state": "dpt", "dpt": "steady_state"}
#: :class:`~explorer.models._vae_module.Decoded`'s fields, in its order
_DECODED = ("u", "s", "rho", "velocity_u", "velocity")
#: the decoded fields that the noise and the held-out fit read
_PREDICTED = ("u", "s")
#: stage 2: cells before each cell in time that are candidates for its initial state,
#: and how many of them (nearest in cell state) it averages
_X0_WINDOW = 60
_X0_NEIGHBORS = 10
#: weight of the rate factors against the time in the warm start's loss
_RHO_WARMUP_WEIGHT = 10.0
#: points of the grid on which each cell's time posterior is evaluated, and the margin
#: beyond the encoder's range of times (a share of that range)
_T_GRID = 64
_T_GRID_MARGIN = 0.1
#: diffusion components for the diffusion pseudotime initial time (scanpy's default)
_DPT_COMPONENTS = 15
#: the diffusion components DPT reads (scanpy's default)
_DPT_DCS = 10
#: initial_time="dpt" starts from the steady-state time instead when DPT's Spearman
#: correlation with it is below this: DPT is then not a clock. Measured: 0.86-0.87 on the
#: two pancreas data sets, 0.95-0.999 on six simulations, -0.24 on the 2,000-cell
#: two-lineage one, whose cells return towards their root's expression as genes switch
#: off, so the diffusion distance from the root falls again late in each lineage
_DPT_MIN_AGREEMENT = 0.5
#: with time_key, a warning where the capture times' Spearman correlation with the steady-state
#: fit's latent time is below this. Measured 2026-12-04: 0.88-0.97 for four capture times on
#: the four lineage-rate simulations (with and without overlap), 0.52 for CellRank's dentate
#: gyrus' ages (P12 / P35: every stage in both), where the fit's velocities all but vanish
_CAPTURE_MIN_AGREEMENT = 0.7
#: z of the two-sided 90 % interval
_Z90 = 1.6448536
#: the residual bootstrap of the time posterior's temperature: synthetic cells (at most),
#: the nominal coverage it calibrates to, and the temperatures tried (log-spaced from 1)
_N_SYNTHETIC = 1024
_LEVEL = 0.9
_MAX_TEMPERATURE = 1e4
_N_TEMPERATURES = 81
#: the polish's learning rates over stage 1's (networks and ODE parameters alike): with
#: time, state and the decoder's features fixed each gene is a small regression, and on
#: the two-lineage simulations 20x reached in 10-25 epochs the held-out MSE that 1x
#: reached in 50 (README, "VeloVAE")
_POLISH_LR_FACTOR = 20.0
#: the state stage's learning rates over stage 1's: with the time fixed it is a VAE of
#: the cell state alone; on the tests' two-lineage simulations 5x converged in 69
#: epochs to the held-out MSE 1x reached in 107-125 (measured with the onsets and
#: switch-offs trained too, 2026-12-02)
_STATE_LR_FACTOR = 5.0


def _curve_sse(u: Any, s: Any, cu: Any, cs: Any, data: Any, *, free_rate: bool) -> Any:
    """``(G,)`` squared distance of the cells to a curve, in units of each gene's spread.

    ``u``, ``s``, ``cu``, ``cs`` are ``(G, n_obs)``: the data and the curve at each cell's
    time. With ``free_rate`` (the full model) each cell and gene scales the curve by its
    least-squares rate factor ``rho >= 0``, so what is scored is the direction of the
    cell's ``(u, s)`` from the origin against the curve's: induction or repression.
    """
    wu, ws = 1 / data.std_u**2, 1 / data.std_s**2
    if free_rate:
        den = cu * cu * wu + cs * cs * ws
        rho = ((u * cu * wu + s * cs * ws) / den.clamp(min=1e-12)).clamp(min=0)
        cu, cs = rho * cu, rho * cs
    return ((u - cu) ** 2 * wu + (s - cs) ** 2 * ws).sum(1)


def _dense32(matrix: Any) -> np.ndarray:
    arr = matrix.toarray() if hasattr(matrix, "toarray") else np.asarray(matrix)
    return np.ascontiguousarray(arr, dtype=np.float32)


class VeloVAE(Hyperparameters):
    """VeloVAE (Gu et al. 2022): latent time, cell state and posterior uncertainty.

    Parameters
    ----------
    variant
        ``"full"`` (the paper's VeloVAE): time and a cell state ``c`` whose decoder gives
        relative transcription rates ``rho`` per cell and gene, then the second stage;
        ``"basic"``: time only, one transcription rate per gene with gene-specific
        switch-on and switch-off times.
    genes
        ``"all"`` (as the ``velovae`` package), ``"velocity_genes"`` (the steady-state
        model's) or a list of names; other genes get NaN.
    dim_c
        Dimensions of the cell state (the paper: 5).
    hidden
        Encoder hidden layers (the paper: 500 and 250, batch norm and dropout); the
        decoder mirrors them.
    dropout
        Dropout after each of the decoder's hidden layers (the paper: 0.2, after the
        encoder's too).
    encoder_dropout
        Dropout after each of the encoder's hidden layers (default 0 since 2026-12-03,
        beyond the paper; ``encoder_dropout=0.2`` is the paper's). Measured against
        0.2 (README, "VeloVAE"): on the pancreas the held-out MSE was 0.65 / 0.61 / 0.74
        against 0.73 / 0.64 / 0.71 (seeds 0 / 1 / 2), the endocrine types after
        Pre-endocrine went from three / three / none to four / three / three, the
        velocities from Pre-endocrine into Alpha and Beta from backward to forward with
        seeds 1 and 2, and the fit took about half the time (stage 1 converged sooner);
        on scVelo's own time axis the two draws whose earliest cells stage 1 put at the
        end were ordered (0.863 / 0.823 to 0.9996 / 0.9977).
    learning_rate
        Adam's learning rate for the networks (the paper: 2e-4); the ODE parameters use
        8x (as the ``velovae`` package). 1e-3 converges faster on the pancreas (held-out
        MSE 1.6 after 58 epochs) but gave a worse latent time on a two-lineage
        simulation (Spearman 0.77 against 0.87).
    batch_size
        Cells per minibatch (the paper: 128).
    max_epochs, max_epochs_stage2
        Upper bounds on the epochs of the two stages (``max_epochs`` also bounds the
        state stage, see ``time_c_prior_sd``).
    max_epochs_polish
        Epochs (all run; 0: none) that refit the kinetics and the last layer of the
        ``rho`` decoder by maximum likelihood at each cell's refined time and state,
        between the state stage and stage 2, at learning rates annealed to 0 over these
        epochs (kept only if the held-out log-likelihood rises and the held-out MSE does
        not; see :meth:`_polish`). 50 annealed epochs (the default since 2026-12-03)
        lowered the pancreas' held-out MSE from 1.96 to 0.73 where 25 at a constant rate
        reached 0.91, for 8 s instead of 4 (with the encoder's dropout; without it, the
        default since the same night, from 1.38 to 0.65). After the default state stage 25 constant
        epochs lowered the held-out MSE on the tests' two-lineage simulation from 8.8 to
        6.1 (2026-12-03). With ``time_c_prior_sd=None`` (no state stage), on the tests' two-lineage
        simulation 25 epochs lowered the held-out MSE from 27.8 to 6.0 (seed 2: 23.9 to 5.8;
        the rate-differing lineages 6.1 to 1.9 and 10.8 to 1.6) for 2-3 CPU-s, with the time
        unchanged; on the pancreas from 2.13 to 1.05 (all genes) and from 1.66 to 0.78 on
        the dynamical model's 328 genes (that model: 0.875), for 29 CPU-s. 50 epochs (43
        run, then converged): 1.01 and 0.83 for 47 CPU-s.
    tol, patience
        Stop a stage once the mean held-out ELBO of the last ``patience`` epochs is less
        than ``tol`` (relative) above that of the ``patience`` epochs before.
    n_warmup_epochs
        Epochs that first pull the encoder's time towards the initial time (0: none).
    train_fraction
        Share of cells trained on (a seeded split; the rest scores the held-out figures).
    time_key
        Obs column with capture times: an informative prior on each cell's time and the
        initial time, instead of the steady-state fit. Where a kNN graph is present the
        capture times' Spearman correlation with the steady-state fit's latent time is
        recorded in ``self.initial_time_["agreement"]``, with a warning below 0.7 (capture
        times that do not follow the cells' own order). With lineages that run their genes
        at different rates, capture times are what aligns them (README, "VeloVAE").
    initial_time
        Without ``time_key``: ``"dpt"`` (the default since 2026-12-03), scanpy's diffusion
        pseudotime on the kNN graph, rooted at the first root cell of the steady-state fit's
        latent time (:func:`diffusion_pseudotime`), or ``"steady_state"``, that latent time
        itself. DPT is a distance from the root, not a clock: where cells return towards the
        root's expression (genes switching off) it falls again, so where its Spearman
        correlation with the steady-state time is below 0.5 the fit starts from the
        steady-state time, with a warning; ``self.initial_time_`` records which time was used
        and that correlation (measured 0.86-0.87 on the two pancreas data sets, 0.95-0.999 on
        six simulations, -0.24 on the benchmark's 2,000-cell one). That fallback first spreads
        the cells the steady-state time ties at its start (:func:`untie_start`; the share in
        ``self.initial_time_["tied_at_start"]``): on the two 2,000-cell simulations where DPT is
        refused the latent time then reached 0.9981-0.9992 in nine fits (four and five seeds),
        against 0.9615-0.9981 (2026-12-05, README, "VeloVAE", "Seeds, side by side"); ``"steady_state"``
        asked for by name keeps the time as it is. The fitted latent time keeps
        its initial time's order (README, "VeloVAE"). Measured 2026-12-03 with the compiled
        kernels (DPT / steady-state time, the same seed and split): on four two-lineage
        simulations the latent time was 0.9981 / 0.988, 0.9980 / 0.9982, 0.9923 / 0.9947 and
        0.9982 / 0.9954, the held-out MSE 3.6 / 6.0, 3.5 / 4.2, 1.6 / 2.8 and 1.6 / 3.2,
        coverage 0.95-0.99 / 0.93-0.99; on scVelo's simulator the time was the same
        (0.9992-0.9993) but the held-out MSE 1.13 / 0.51 and 1.30 / 0.46. On the pancreas
        (seeds 0, 1, 2) the held-out MSE was 0.87, 0.80, 0.80 against 0.92, 0.76, 0.77 (level:
        before the kernels 0.72-0.82 against 0.97-1.00), and the endocrine types after
        Pre-endocrine were Alpha, Beta and Delta / none, the same / Beta, none / Beta, all
        within 0.03 of it but Epsilon, 0.05 before; on the 739-cell pancreas all four with
        every seed.
    time_temperature
        How the grid posterior of each cell's time is tempered for the genes'
        correlated residuals: ``"participation"``, ``2 G / n_eff`` from the residual
        covariance, or ``"bootstrap"``, calibrated on synthetic cells built from the
        fit's residuals (see :meth:`_refine_time`). On two-lineage and scVelo
        simulations the bootstrap's temperatures were 3-17x lower than the participation
        ratio's (1-8 against 5.6-27), the full model's intervals covered fewer true times
        in 7 of 8 fits (0.31-0.82 against 0.39-0.94), and its SD ranked cells by error no
        better: the time error is mostly the fitted clock's bias, not noise, so it is not
        the default.
    time_posterior
        Which model's curves the reported time posterior (``latent_time``, its SD) is read
        on: ``"stage1"`` (the default), stage 1's, right after it (:meth:`_refine_time`), or
        ``"final"``, read again on the same grid after the state stage and the polish, with
        each cell's own state and at stage 1's temperature; stage 2 and the read-outs then
        use that time. Measured 2026-12-05 (README, "VeloVAE", "The time's uncertainty in
        cells"): its intervals counted in cells rank the cells by their rank error on 9 of
        9 of scVelo's draws and 11 of 12 two-lineage simulations (the default's 6 and 3),
        the latent time moves by at most 0.006, the pancreas' endocrine placement is the
        default's (seeds 0-2), but its intervals cover 0.43-0.79 of the true times where
        lineages differ (the default 0.56-0.95; on scVelo's simulator 0.83-0.97 against
        0.96-0.99). Not the default.
    time_sd
        What each cell's written time SD (``obs['latent_time_std']``, the inspector's
        interval, the "latent time SD" colouring) holds. ``"two_starts"`` (the default
        since 2026-12-05): a second start, from the other initial time (``"dpt"`` /
        ``"steady_state"``; where DPT is refused the steady-state time with the next
        seed; with ``time_key`` the next seed), is fitted first, until its time is read
        (stage 1 and the time grid), and each cell's SD on the clock is ``sqrt(sd^2 + shift^2)``:
        the grid posterior's ``sd`` and :func:`start_shift`, where the second start places
        the cell (its rank there, on this fit's clock) minus where this fit does. The time,
        velocity and everything else stay this fit's; ``obs['latent_time_std_posterior']``
        and ``obs['latent_time_start_shift']`` hold the two parts. A lineage's cells share
        one time error that no per-cell posterior sees and that a fit from another start
        places elsewhere. ``"posterior"``: the grid posterior's SD alone, one fit (the
        default before). Ignored with ``n_starts`` above 1 (the pooled SD). Measured
        2026-12-05 (README, "VeloVAE", "The time SD with a second start").
    t_max
        Length of the time axis the initial times are put on (scVelo's 20).
    n_samples
        Posterior samples for the velocity uncertainty.
    n_starts
        Fits whose latent times are pooled (1: one fit, the default). Start ``k`` uses
        ``initial_time`` for even ``k`` and the other initial time (``"dpt"`` /
        ``"steady_state"``) for odd ``k``, and the training seed ``seed + k // 2`` (with
        ``time_key``: the capture times and seed ``seed + k``); the train/test split stays
        the first start's. Where DPT is refused (see ``initial_time``) every start uses the
        steady-state time, and a start that would repeat an earlier start's initial time
        and seed takes the next seed (before, the two starts were one fit twice and the
        between-start SD was 0). The reported ``latent_time`` and ``latent_time_std`` are then the
        ensemble's (:func:`ensemble_time`): each start's time as its rank among the
        cells, averaged over the starts, with the SD of the mixture of the starts'
        posteriors (mean within-start variance plus between-start variance). Everything
        else (velocity, rates, predictions, ``latent_time_model``, ``metrics_``) is the
        first start's; the others are in ``self.members_``, the time parts in
        ``self.ensemble_``. The starts' clocks disagree where one of them stalls, which no
        single posterior sees. With 2 starts and the default settings (2026-12-04), on
        twelve two-lineage simulations the nominal 90 % intervals covered 74-99 % of the
        true times (within 10 points on ten; one start: 57-94 %, on two) and the time
        ranked the cells better than one start's on ten; on scVelo's simulator 97 %. On
        the 3,696-cell pancreas it puts Epsilon before Pre-endocrine (seeds 0-2, where
        one start puts it after with seed 0) and takes twice the time (101-114 s), so it
        is not the default. See README, "VeloVAE", "Two starts pooled".
    switch_off
        Which genes have a switch-off time after which they are repressed (``var['fit_t_']``;
        ``inf`` for a gene without one, which stays induced from its onset at rate
        ``rho alpha``). ``True`` (the default of both variants): every gene has gene-specific
        switch-on and switch-off times. ``False``: none, as the ``velovae``
        package's full model, where a gene that is down in some cells is a low ``rho``
        there. ``"per_gene"``: a gene keeps its switch-off when,
        at the initial time and with each cell's least-squares rate factor, the on/off
        curve is at least 10 % closer to the cells than the always-induced one, that is
        when the cells show repression (below the induction curve), not just a lineage
        that does not express the gene (with ``True`` the switch-off of a gene one lineage
        expresses, such as the pancreas' Sst and Ghrl, held that lineage's cells before
        it). Measured (README, "VeloVAE"): on the tests' two-lineage simulation the full
        model's latent time rose from 0.9808 to 0.9881 (seed 2: 0.992 to 0.9958) with
        coverage 0.84 / 0.95 and held-out MSE 6.0 / 6.5; on the pancreas the held-out MSE on
        the dynamical model's genes fell from 0.81 to 0.65 (all genes 1.10 either way), the
        cluster order unchanged (Delta is then held by where stage 1 put Sst's onset).
        ``False`` on the simulation: latent time 0.943, coverage 0.66. Not the default
        (``True`` is, for both variants): an always-induced gene has positive velocity in
        every cell, and on the pancreas ``"per_gene"`` left 1,042 of 1,126 genes without a
        switch-off, among them about 390 whose expression falls along latent time; on the
        dynamical model's genes whose expression falls, the share of cells with negative
        velocity went from 0.52 (``True``; the dynamical model 0.58) to 0.12.
    c_prior_sd
        Standard deviation of the cell state's prior ``c ~ N(0, c_prior_sd^2 I)`` (the
        full model; the issue and the paper: 1) in the model's ELBO and, by default, the
        prior the state is finally learned under (see ``time_c_prior_sd``).
    time_c_prior_sd
        The cell state's prior SD while stage 1 learns the time (the full model; ``None``:
        ``c_prior_sd``, one stage, the default until 2026-12-02). The default, 0.01 (the
        ``velovae`` package's ``std_z_prior``), holds every cell's state near the others'
        unless the data pull it away, so the time explains what it can and ``rho`` does not
        take it over; after the time grid, a state stage (:meth:`_state_stage`) re-learns the
        state, the ``rho`` decoder and the rates under ``c_prior_sd`` with each cell's time
        and each gene's onset and switch-off fixed. Measured (2026-12-03, from the steady-state
        initial time; default / ``None``):
        on the tests' two-lineage simulation the full model's latent time rose from 0.9808 to
        0.988 (seed 2: 0.992 to 0.9982), above the basic model's 0.981 / 0.9974, and on the
        benchmark's 2,000-cell one from 0.945 to 0.9977 (basic 0.9984, the package 0.986 from
        the same initial time); 90 % intervals covered 0.99 / 0.96 / 0.90 of the true times
        (``None``: 0.84 / 0.94 / 0.66). On lineages with different rates (two seeds) the time
        was 0.9947 / 0.9954 (``None``: 0.9942 / 0.9869; basic 0.9873 / 0.9956) and on scVelo's
        simulator unchanged (0.9992-0.9993). The held-out MSE fell on three of those seven
        simulations (5.7 to 4.2, 5.6 to 4.9, 3.6 to 2.8) and rose on four (5.7 to 6.1, 3.2 to
        3.3, and on scVelo's simulator 0.30 to 0.52 and 0.31 to 0.48); on the pancreas it fell
        from 1.10 to 0.98 (all genes) and from 0.81 to 0.68 on the dynamical model's 328 genes
        (that model: 0.875). The SD ranked cells by error worse (-0.35 / -0.18 / -0.22 against
        -0.19 / +0.35 / +0.56), the fit takes about 2-4x the CPU time (the tight stage 1 runs
        longer: on the pancreas 174 epochs instead of 63, then 20 state epochs), and on the
        pancreas Beta's median latent time (0.875) moved just before Pre-endocrine's (0.883;
        seed 1: after it). On the 739-cell pancreas every endocrine type comes after
        Pre-endocrine with seeds 0-2 (``None``: on none), held-out MSE 0.62-0.76 (1.20-1.41).
        ``c_prior_sd=0.01`` alone (one stage under the tight prior) gives the same time with
        states near 0 and a held-out MSE of 13.3 on the tests' simulation (1.45 on the
        pancreas).
    seed
        Seed of the split, initial weights, minibatches and posterior samples.
    split_seed
        Seed of the train/test split alone (``None``: ``seed``); the starts of
        ``n_starts`` share their first start's split.
    device
        ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.

    Examples
    --------
    >>> result = VeloVAE().fit(adata)  # doctest: +SKIP
    >>> result.to_adata(adata)  # doctest: +SKIP
    """

    name: ClassVar[str] = "velovae"
    #: stage 1 re-estimates the per-gene noise every this many epochs (0: never)
    _sigma_every: ClassVar[int] = 5
    #: set on a second start (``time_sd="two_starts"``): the first start's asked initial time
    _second_of: str | None = None
    #: set on a second start: its warnings (about its own start, or the capture times the
    #: first start warns of) are not the user's to read
    _quiet: bool = False
    #: the steady-state time, its order and DPT ``(t_ss, order, t_dpt)``: computed by a fit's
    #: first start and handed to its other (the same data, genes and seed give the same times)
    _times: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    param_ranges: ClassVar[dict[str, str]] = {
        "dim_c": "[1, inf)",
        "hidden": "[1, inf)",
        "dropout": "[0, 1)",
        "encoder_dropout": "[0, 1)",
        "learning_rate": "(0, inf)",
        "batch_size": "[2, inf)",
        "max_epochs": "[1, inf)",
        "max_epochs_stage2": "[0, inf)",
        "max_epochs_polish": "[0, inf)",
        "tol": "[0, inf)",
        "patience": "[1, inf)",
        "n_warmup_epochs": "[0, inf)",
        "train_fraction": "(0, 1]",
        "t_max": "(0, inf)",
        "n_samples": "[2, inf)",
        "n_starts": "[1, inf)",
        "c_prior_sd": "(0, inf)",
        "time_c_prior_sd": "(0, inf)",
    }

    def __init__(
        self,
        *,
        variant: Variant = "full",
        genes: GeneSelection | Sequence[str] = "all",
        dim_c: int = 5,
        hidden: tuple[int, int] = (500, 250),
        dropout: float = 0.2,
        encoder_dropout: float = 0.0,
        learning_rate: float = 2e-4,
        batch_size: int = 128,
        max_epochs: int = 300,
        max_epochs_stage2: int = 100,
        max_epochs_polish: int = 50,
        tol: float = 1e-3,
        patience: int = 5,
        n_warmup_epochs: int = 8,
        train_fraction: float = 0.7,
        time_key: str | None = None,
        initial_time: InitialTime = "dpt",
        time_temperature: TimeTemperature = "participation",
        time_posterior: TimePosterior = "stage1",
        time_sd: TimeSD = "two_starts",
        t_max: float = 20.0,
        n_samples: int = 25,
        n_starts: int = 1,
        switch_off: bool | SwitchOff = True,
        c_prior_sd: float = 1.0,
        time_c_prior_sd: float | None = 0.01,
        seed: int = 0,
        split_seed: int | None = None,
        device: Device = "auto",
    ) -> None:
        self.variant = variant
        self.genes = genes
        self.dim_c = dim_c
        self.hidden = hidden
        self.dropout = dropout
        self.encoder_dropout = encoder_dropout
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.max_epochs_stage2 = max_epochs_stage2
        self.max_epochs_polish = max_epochs_polish
        self.tol = tol
        self.patience = patience
        self.n_warmup_epochs = n_warmup_epochs
        self.train_fraction = train_fraction
        self.time_key = time_key
        self.initial_time = initial_time
        self.time_temperature = time_temperature
        self.time_posterior = time_posterior
        self.time_sd = time_sd
        self.t_max = t_max
        self.n_samples = n_samples
        self.n_starts = n_starts
        self.switch_off = switch_off
        self.c_prior_sd = c_prior_sd
        self.time_c_prior_sd = time_c_prior_sd
        self.seed = seed
        self.split_seed = split_seed
        self.device = device

    # ------------------------------------------------------------------------------ checks

    def _check(self, adata: AnnData) -> None:
        require_layers(adata, self.name)
        if self.time_key is None and Key.obsp.CONNECTIVITIES not in adata.obsp:
            msg = (
                "The velovae model orients its initial time with the neighbour graph "
                f"obsp[{Key.obsp.CONNECTIVITIES!r}]; adata.obsp has {sorted(adata.obsp)}. Run "
                "explorer.pipeline.prepare(adata), or pass time_key= naming an obs column "
                "of capture times."
            )
            raise InputError(msg)
        if self.time_key is not None:
            if self.time_key not in adata.obs:
                msg = (
                    f"time_key={self.time_key!r} is not an obs column; adata.obs has "
                    f"{list(adata.obs.columns)}. Name the column of capture times, or leave time_key out."
                )
                raise InputError(msg)
            column = adata.obs[self.time_key]
            values = pd.to_numeric(column, errors="coerce").to_numpy(dtype=float)
            bad = ~np.isfinite(values)
            if bad.any():
                found = pd.unique(np.asarray(column.astype(object))[bad])
                shown = ", ".join(repr(v) for v in found[:3]) + (", ..." if len(found) > 3 else "")
                msg = (
                    f"obs[{self.time_key!r}] must hold a number (the capture time) for every cell; "
                    f"{int(bad.sum())} of {adata.n_obs} cells hold {shown} instead. Give capture "
                    "times as numbers (e.g. 'E12.5' as 12.5, 'day 3' as 3), or fill or drop the "
                    "cells without one."
                )
                raise InputError(msg)
        n_train = round(self.train_fraction * adata.n_obs)
        if n_train < 2 or adata.n_obs < 4:
            msg = f"velovae needs at least 2 training cells; {adata.n_obs} cells x {self.train_fraction} give {n_train}."
            raise InputError(msg)

    def _select_genes(self, adata: AnnData) -> np.ndarray:
        """``(n_vars,)`` mask of the genes to fit (:func:`~explorer.models.steady_state.genes_to_fit`)."""
        return genes_to_fit(adata, self.genes)

    # ------------------------------------------------------------------------------ fit

    def fit(self, adata: AnnData, *, progress: ProgressCallback | None = None) -> VelocityResult:
        """Train on layers ``Mu``/``Ms``; ``adata`` is left unchanged.

        Returns
        -------
        A :class:`~explorer.models.base.VelocityResult` with the spliced and unspliced
        velocity, ``latent_time`` (posterior mean scaled to [0, 1]) and the per-cell
        velocity uncertainty; ``gene_params`` ``fit_alpha``, ``fit_beta`` (scVelo's
        convention: the ODE rate divided by ``fit_scaling``), ``fit_gamma``,
        ``fit_scaling``, ``fit_t_on``, ``fit_t_`` (switch-off), ``fit_sigma_u``,
        ``fit_sigma_s``, ``fit_r2``, ``fit_likelihood``, ``fit_mse_train``,
        ``fit_mse_test``; layers ``predicted_u``, ``predicted_s``, ``rho`` and
        ``velocity_variance`` (each gene's sample variance, ``ddof=1``, of the velocity
        over the ``n_samples`` posterior draws of :meth:`sample_velocity`); obs
        ``latent_time_std``, ``latent_time_cv``, ``latent_time_rank_width``
        (:func:`rank_width`), ``latent_time_model`` and ``fit_train``, and with
        ``time_sd="two_starts"`` ``latent_time_std_posterior`` and
        ``latent_time_start_shift`` (``self.time_sd_`` holds them on the clock,
        ``self.members_`` both starts); obsm ``cell_state`` and ``cell_state_std`` (full
        model).
        Held-out figures are in ``self.metrics_``, the ELBO per epoch in
        ``self.history_``, the encoder's and the grid's time posterior in
        ``self.time_posterior_``. With ``n_starts > 1``, ``latent_time``,
        ``latent_time_std`` and ``latent_time_cv`` are the starts' pooled time
        (:func:`ensemble_time`), ``self.ensemble_`` holds it with its within- and
        between-start SDs (``latent_time_std_within``, ``latent_time_std_between``, on
        the ``latent_time`` scale) and ``self.members_`` the fitted starts; the rest is
        the first start's.
        """
        _import_torch()  # a clear message where torch is missing, before any work
        self._check(adata)
        self._times = None  # an earlier fit's times are another data set's
        if self.n_starts > 1:
            return self._fit_starts(adata, progress)
        if self.time_sd == "two_starts":
            return self._fit_with_second_start(adata, progress)
        result = self._fit_one(adata, progress)
        assert result is not None  # noqa: S101 - only a time-only fit returns none
        return result

    def _fit_one(
        self, adata: AnnData, progress: ProgressCallback | None, *, time_only: bool = False
    ) -> VelocityResult | None:
        """One fit from one start (see :meth:`fit`); ``time_only``: stop once each cell's time is read.

        A time-only fit ends after stage 1 and the time grid (:meth:`_refine_time`), with
        ``time_posterior_``, ``initial_time_`` and ``timings_`` set, and returns None: all a
        second start is read for (the stages after it leave the time as it is).
        """
        torch = _import_torch()
        device = _resolve_device(self.device)
        fitted = self._select_genes(adata)
        cols = np.flatnonzero(fitted)
        if len(cols) == 0:
            msg = f"No gene to fit: the gene selection is empty. Pass {model_param('genes', 'all')}."
            raise InputError(msg)
        clock = time.perf_counter()
        timings: dict[str, float] = {}
        n_obs = adata.n_obs
        # read, not copied, where every gene is fitted and the layer is float32 already
        # (nothing here writes into them: the input is left as it is)
        every_gene = len(cols) == adata.n_vars
        Mu, Ms = (
            _dense32(adata.layers[key] if every_gene else adata.layers[key][:, cols])
            for key in (Key.layers.MU, Key.layers.MS)
        )

        stage2_epochs = self.max_epochs_stage2 if self.variant == "full" else 0
        state_epochs = self.max_epochs if self._state_stage_runs() else 0
        total = 2 + self.n_warmup_epochs + self.max_epochs + state_epochs + self.max_epochs_polish + stage2_epochs + 1
        step = 0
        report(progress, step, total, "initial fit")
        init, t_init, t_prior = self._initialize(adata, Mu, Ms, cols, device)
        timings["init"] = time.perf_counter() - clock
        if self._second_of is not None and self.initial_time_["used"] == self._first_start_used():
            self.seed += 1  # a second start from the first's own initial time: another training seed
        step += 1
        report(progress, step, total, "initial fit")

        torch.manual_seed(self.seed)
        rng = np.random.default_rng(self.seed if self.split_seed is None else self.split_seed)
        order = rng.permutation(n_obs)
        n_train = round(self.train_fraction * n_obs)
        train = np.zeros(n_obs, dtype=bool)
        train[order[:n_train]] = True
        if train.all():
            test_idx = np.flatnonzero(train)  # no held-out cells: converge on the training ELBO
        else:
            test_idx = np.flatnonzero(~train)
        train_idx = np.flatnonzero(train)

        from explorer.models._vae_module import VAEModule

        std_u = Mu.std(0).clip(min=1e-6)
        std_s = Ms.std(0).clip(min=1e-6)
        tensors = _Tensors(
            u=torch.from_numpy(Mu).to(device),
            s=torch.from_numpy(Ms).to(device),
            std_u=torch.from_numpy(std_u).to(device),
            std_s=torch.from_numpy(std_s).to(device),
            prior_mean=torch.from_numpy(t_prior[0][:, None].astype(np.float32)).to(device),
            prior_sd=torch.from_numpy(t_prior[1][:, None].astype(np.float32)).to(device),
        )
        module = VAEModule(
            len(cols),
            len(cols),
            variant=self.variant,
            dim_c=self.dim_c,
            hidden=tuple(self.hidden),
            dropout=self.dropout,
            encoder_dropout=self.encoder_dropout,
            init={k: torch.from_numpy(v.astype(np.float32)) for k, v in init.items()},
            t_init=float(t_init.mean()),
            switch_off=torch.from_numpy(self._switch_mask),
            c_prior_sd=self._stage1_c_prior_sd(),
        ).to(device)
        history: dict[str, list[float]] = {
            "warmup": [], "stage1": [], "stage1_train": [], "stage1_mse_test": [], "state": [], "stage2": []
        }
        generator = torch.Generator().manual_seed(self.seed)
        run = _Run(module, tensors, train_idx, test_idx, generator, history, progress, total, step)

        # warm start: the encoder's time from the initial time (a few cheap epochs)
        self._warmup(run, t_init)
        self._rho_init = None  # the warm start's targets, read by nothing after it
        # stage 1: the ELBO
        clock = time.perf_counter()
        self._stage1(run)
        timings["stage1"] = time.perf_counter() - clock
        step0 = 2 + self.n_warmup_epochs + self.max_epochs
        if run.step < step0:
            run.step = step0
            report(progress, run.step, total, "stage 1 converged")

        post = self._posterior(module, tensors)
        # close the amortisation gap: each cell's time posterior given its state and the
        # fitted ODE, on a grid, tempered for the genes' correlated residuals
        clock = time.perf_counter()
        post = self._refine_time(module, tensors, post, train_idx)
        timings["refine_time"] = time.perf_counter() - clock
        if time_only:
            self.time_posterior_ = pd.DataFrame(
                {k: post[k][:, 0].detach().float().cpu().numpy() for k in _TIME_PARTS},
                index=adata.obs_names,
            )
            self.history_, self.timings_ = history, timings
            report(progress, total, total, "time read")
            return None
        if self._state_stage_runs():
            clock = time.perf_counter()
            post = self._state_stage(run, post)
            timings["state"] = time.perf_counter() - clock
            run.step = step0 + state_epochs
        if self.max_epochs_polish > 0:
            clock = time.perf_counter()
            self._polish(run, post)
            timings["polish"] = time.perf_counter() - clock
            run.step = step0 + state_epochs + self.max_epochs_polish
        if self.time_posterior == "final":
            clock = time.perf_counter()
            post = self._reread_time(module, tensors, post, train_idx)
            timings["final_time"] = time.perf_counter() - clock
        x0 = None
        if self.variant == "full" and self.max_epochs_stage2 > 0:
            clock = time.perf_counter()
            x0 = self._stage2(run, post)
            timings["stage2"] = time.perf_counter() - clock
            run.step = total - 1
            report(progress, run.step, total, "stage 2 converged")

        clock = time.perf_counter()
        out = self._extract(module, tensors, post, x0, run.generator)
        timings["extract"] = time.perf_counter() - clock
        self.module_ = module
        # what sample_velocity replays: the posterior's tensors and stage 2's initial states
        self.posterior_state_ = (post, x0)
        # the time posterior's parts, on the model's own clock (diagnostics)
        self.time_posterior_ = pd.DataFrame(
            {k: out[k] for k in _TIME_PARTS},
            index=adata.obs_names,
        )
        self.history_ = history
        self.timings_ = timings
        result, self.metrics_ = self._result(adata, cols, out, train, module, (Mu, Ms))
        report(progress, total, total, "done")
        logger.info("velovae: %s; timings (s) %s", self.metrics_, {k: round(v, 2) for k, v in timings.items()})
        return result

    def _fit_with_second_start(self, adata: AnnData, progress: ProgressCallback | None) -> VelocityResult:
        """``time_sd="two_starts"``: a second start's time, then the fit, whose SD it widens.

        The second start runs first and keeps only its time (with ``time_posterior="stage1"``
        it stops once that is read), so that its initial fit does not run beside the
        fit's results (at 100,000 cells that raised the peak by 0.7 GB). Its initial time is
        the other one (``"dpt"`` / ``"steady_state"``), with the fit's seed and split; where
        that turns out to be the fit's own (DPT refused), it trains with the next seed; with
        capture times, the next seed.
        """
        if self.time_key is None:
            second = self._member(_OTHER_START[self.initial_time], self.seed)
            second._second_of = self.initial_time  # noqa: SLF001
        else:
            second = self._member(self.initial_time, self.seed + 1)
        second._quiet = True  # noqa: SLF001
        first = self._member(self.initial_time, self.seed)

        def part(k: int, label: str) -> ProgressCallback | None:
            if progress is None:
                return None

            def relay(p: Any) -> None:
                report(progress, k * p.total + p.step, 2 * p.total, f"{label}{p.message}")

            return relay

        time_only = self.time_posterior == "stage1"
        label = "time SD: "  # the second start's steps (a progress bar shows ~40 characters)
        second._fit_one(adata, part(0, label), time_only=time_only)  # noqa: SLF001
        # the same data, genes and (at its initial time) seed: the second start's times are the fit's
        first._times = second._times  # noqa: SLF001
        res = first._fit_one(adata, part(1, ""))  # noqa: SLF001
        assert res is not None  # noqa: S101 - the first start is fitted whole
        self._adopt(first, [first, second])
        return self._with_second_start(res, second)

    def _member(self, initial_time: str, seed: int) -> VeloVAE:
        """One start of this fit: its parameters but ``initial_time`` and ``seed``, the first split."""
        split = self.seed if self.split_seed is None else self.split_seed
        one = {"n_starts": 1, "time_sd": "posterior", "initial_time": initial_time, "seed": seed}
        return VeloVAE(**{**self.get_params(), **one, "split_seed": split})

    def _adopt(self, first: VeloVAE, members: list[VeloVAE]) -> None:
        """Take the first start's fitted state (``sample_velocity`` and the diagnostics read it)."""
        fitted = (
            "module_", "posterior_state_", "time_posterior_", "history_",
            "timings_", "metrics_", "time_temperature_", "initial_time_", "_switch_mask",
        )  # fmt: skip
        for attr in fitted:
            setattr(self, attr, getattr(first, attr))
        self.members_ = members
        for k, m in enumerate(members[1:], start=2):
            seconds = {key: round(v, 2) for key, v in m.timings_.items()}
            used = m.initial_time_["used"]
            logger.info("velovae: start %d (%s, seed %d): timings (s) %s", k, used, m.seed, seconds)

    def _first_start_used(self) -> str:
        """The initial time a second start's first start uses (``_second_of`` asked, DPT refused or not)."""
        if self._second_of == "dpt" and self._dpt_agreement >= _DPT_MIN_AGREEMENT:
            return "dpt"
        return "steady_state"

    def _fit_starts(self, adata: AnnData, progress: ProgressCallback | None) -> VelocityResult:
        """``n_starts`` fits (see ``n_starts``): the first start's fit with the starts' pooled time.

        Only the other starts' time is read, so (with ``time_posterior="stage1"``, where the
        time is read right after stage 1) they stop there (:meth:`_fit_one`'s ``time_only``).
        """
        n = self.n_starts
        time_only = self.time_posterior == "stage1"
        first, res = self._start(adata, 0, n, progress, [])
        assert res is not None  # noqa: S101 - the first start is fitted whole
        members = [first]
        for k in range(1, n):
            members.append(self._start(adata, k, n, progress, members, time_only=time_only)[0])
        self._adopt(first, members)
        ens = ensemble_time(
            np.stack([m.time_posterior_["t_mean"].to_numpy() for m in members]),
            np.stack([m.time_posterior_["t_sd"].to_numpy() for m in members]),
        )
        lo, hi = float(ens["mean"].min()), float(ens["mean"].max())
        span = hi - lo if hi > lo else 1.0
        latent = ((ens["mean"] - lo) / span).astype(np.float32)
        self.ensemble_ = pd.DataFrame(
            {
                "latent_time": latent,
                "latent_time_std": ens["sd"] / span,
                "latent_time_std_within": ens["sd_within"] / span,
                "latent_time_std_between": ens["sd_between"] / span,
            },
            index=adata.obs_names,
        )
        obs = res.obs.copy()
        obs[Key.obs.LATENT_TIME_STD] = self.ensemble_["latent_time_std"].to_numpy(dtype=np.float32)
        obs[Key.obs.LATENT_TIME_CV] = _time_cv(self.ensemble_["latent_time_std"].to_numpy(), latent, 1.0)
        # the pooled SD already holds the starts' disagreement: counted in cells, not added again
        pooled_sd = self.ensemble_["latent_time_std"].to_numpy()
        obs[Key.obs.LATENT_TIME_RANK_WIDTH] = interval_share(latent, pooled_sd).astype(np.float32)
        return dataclasses.replace(res, params=self.get_params(), latent_time=latent, obs=obs)

    def _with_second_start(self, res: VelocityResult, second: VeloVAE) -> VelocityResult:
        """``res`` with its time SD holding where ``second`` places each cell (``time_sd="two_starts"``).

        The SD on the fit's clock is ``sqrt(sd^2 + shift^2)``: the grid posterior's ``sd``
        and :func:`start_shift`, the second start's place for the cell on this clock minus
        this fit's. Written as ``latent_time_std`` (and its CV and rank width), beside the
        posterior's own (``latent_time_std_posterior``) and the shift
        (``latent_time_start_shift``); ``self.time_sd_`` holds the three on the clock.
        """
        tp = self.time_posterior_
        t, sd = tp["t_mean"].to_numpy(np.float64), tp["t_sd"].to_numpy(np.float64)
        shift = start_shift(t, second.time_posterior_["t_mean"].to_numpy(np.float64))
        total = np.sqrt(sd**2 + shift**2)
        self.time_sd_ = pd.DataFrame({"posterior": sd, "shift": shift, "sd": total}, index=tp.index)
        lo, hi = float(t.min()), float(t.max())
        span = hi - lo if hi > lo else 1.0
        obs = res.obs.copy()
        obs[Key.obs.LATENT_TIME_STD] = (total / span).astype(np.float32)
        obs[Key.obs.LATENT_TIME_CV] = _time_cv(total, t, self.t_max)
        obs[Key.obs.LATENT_TIME_STD_POSTERIOR] = (sd / span).astype(np.float32)
        obs[Key.obs.LATENT_TIME_START_SHIFT] = (shift / span).astype(np.float32)
        # the SD holds the second start's disagreement: counted in cells, the start spread not added
        obs[Key.obs.LATENT_TIME_RANK_WIDTH] = interval_share(t, total).astype(np.float32)
        return dataclasses.replace(res, params=self.get_params(), obs=obs)

    def _start(
        self,
        adata: AnnData,
        k: int,
        n: int,
        progress: ProgressCallback | None,
        earlier: list[VeloVAE],
        *,
        time_only: bool = False,
    ) -> tuple[VeloVAE, VelocityResult | None]:
        """Fit start ``k`` of ``n``: its initial time and seed (see ``n_starts``), the first split.

        A start whose initial time (the one used, after any refusal of DPT) and seed are an
        ``earlier`` start's would be the same fit: it takes the next seed instead. Where
        an earlier start found DPT refused, a DPT start asks for the steady-state time
        directly; where the refusal is only found by this start, it is fitted again.
        """
        own = k % 2 == 0 or self.time_key is not None
        init = self.initial_time if own else _OTHER_START[self.initial_time]
        seed = self.seed + (k if self.time_key is not None else k // 2)
        refused = self.time_key is None and any(m.initial_time_["used"] != m.initial_time for m in earlier)
        if init == "dpt" and refused:
            init = "steady_state"  # DPT was refused on these cells: it would be again
        taken = {(m.initial_time_["used"], m.seed) for m in earlier}

        def member_progress(p: Any) -> None:
            message = f"start {k + 1}/{n}: {p.message}"
            report(progress, k * p.total + p.step, n * p.total, message)

        while True:
            while (init, seed) in taken:
                seed += 1
            member = self._member(init, seed)
            member_report = None if progress is None else member_progress
            result = member._fit_one(adata, member_report, time_only=time_only)  # noqa: SLF001
            if (member.initial_time_["used"], seed) not in taken:
                return member, result
            init = member.initial_time_["used"]

    # ------------------------------------------------------------------------------ init

    def _initialize(
        self, adata: AnnData, Mu: np.ndarray, Ms: np.ndarray, cols: np.ndarray, device: torch.device
    ) -> tuple[dict[str, np.ndarray], np.ndarray, tuple[np.ndarray, np.ndarray]]:
        """Initial per-gene kinetics, each cell's initial time and the time prior ``(mean, sd)``.

        The time comes from capture times (``time_key``) scaled to ``[0, t_max]``, or
        from the steady-state fit: scVelo's initial kinetics of each gene (steady-state
        slope, :func:`explorer.models._em.initialize`), one time assignment per gene,
        root cells from the steady-state velocity graph and scVelo's latent time over
        the genes. The kinetics (onset, switch, rates) are then refitted on that shared
        time, as the dynamical model fits its onsets.
        """
        import torch

        from explorer.models import _em

        self._start_spread = None
        self._tied_at_start = 0.0
        self._dpt_agreement = float("nan")
        u = torch.from_numpy(np.ascontiguousarray(Mu.T)).to(device)
        s = torch.from_numpy(np.ascontiguousarray(Ms.T)).to(device)
        data, _ = _em.prepare(u, s)
        init = _em.initialize(data)
        n_obs = Mu.shape[0]
        if self.time_key is not None:
            cap = pd.to_numeric(adata.obs[self.time_key]).to_numpy(dtype=float)
            span = cap.max() - cap.min()
            t0 = (cap - cap.min()) / span * self.t_max if span > 0 else np.full(n_obs, self.t_max / 2)
            levels = np.unique(t0)
            gap = np.diff(levels).min() if len(levels) > 1 else self.t_max
            # capture times are only known to their sampling interval: half a gap either side
            prior = (t0, np.full(n_obs, max(gap / 2, 1e-3 * self.t_max)))
            used, agreement = "capture_times", self._capture_agreement(adata, data, init, cols, cap)
        else:
            t_unit, used, agreement = self._initial_time(adata, data, init, cols)
            t0 = t_unit * self.t_max
            # a weak prior over the whole axis (velovae: mean t_max / 2, sd t_max / 2)
            prior = (np.full(n_obs, self.t_max / 2), np.full(n_obs, self.t_max / 2))
        # the kinetics refitted on that time a block of genes at a time: each gene's fit is
        # its own (the same numbers as all at once), and the fit's (genes, cells) arrays are
        # a block's (all genes' rose 2.2 GB above the data at 100,000 cells and 200 genes)
        n_genes = u.shape[0]
        t_row = torch.from_numpy(t0.astype(np.float32)).to(device)
        rho_target = rho_weight = None
        if self.variant == "full":
            rho_target = np.empty((n_obs, n_genes), dtype=np.float32)
            rho_weight = np.empty((n_obs, n_genes), dtype=np.float32)
        parts = []
        for block in gene_blocks(n_obs, n_genes):
            p_b, switches_b, sigma_b, rho_b = self._refit_kinetics(
                _em.take_genes(data, block), _em.take_genes(init, block), t_row
            )
            if rho_b is not None:
                rho_target[:, block], rho_weight[:, block] = rho_b
            parts.append((p_b, switches_b, sigma_b))
        del data, u, s
        p = _em.stack_genes(*(part[0] for part in parts))
        self._switch_mask = torch.cat([part[1] for part in parts]).cpu().numpy()
        sigma_u = torch.cat([part[2][0] for part in parts])
        sigma_s = torch.cat([part[2][1] for part in parts])

        def vec(x: torch.Tensor) -> np.ndarray:
            return x.reshape(-1).double().cpu().numpy()

        std_u, std_s = Mu.std(0).astype(np.float64), Ms.std(0).astype(np.float64)
        params = {
            "alpha": vec(p.alpha),
            "beta": vec(p.beta),
            "gamma": vec(p.gamma),
            "scaling": vec(p.scaling),
            "t_on": vec(p.t_on),
            "t_off": vec(p.t_),
            "sigma_u": np.maximum(vec(sigma_u), _SIGMA_FLOOR * std_u + 1e-6),
            "sigma_s": np.maximum(vec(sigma_s), _SIGMA_FLOOR * std_s + 1e-6),
        }
        for k, v in params.items():
            params[k] = np.nan_to_num(v, nan=1.0, posinf=1.0, neginf=0.0)
        self._rho_init = None
        if rho_target is not None:
            rho_weight = np.nan_to_num(rho_weight, copy=False)
            self._rho_init = (np.nan_to_num(rho_target, nan=1.0, copy=False), rho_weight)
        self.initial_time_ = {"used": used, "agreement": agreement, "tied_at_start": self._tied_at_start}
        return params, t0, prior

    def _refit_kinetics(self, data: Any, init: Any, t_row: torch.Tensor) -> tuple[Any, Any, Any, Any]:
        """A block of genes' kinetics refitted at each cell's initial time ``t_row`` ``(n_obs,)``.

        ``data`` and ``init`` are the genes' :class:`explorer.models._em.GeneData` and
        initial guess. Returns the parameters, the genes' switch-off mask, their noise
        ``(sigma_u, sigma_s)`` and, for the full model, each cell's rate factor target and
        its weight, each ``(n_obs, genes)`` (else None).
        """
        import torch

        from explorer.models import _em

        with torch.inference_mode():
            u, s = data.u, data.s
            t_cells = t_row.expand_as(u)
            grid = {
                "t_on_grid": [x * self.t_max for x in (-0.3, 0.0, 0.2, 0.4, 0.6)],
                "duration_grid": [x * self.t_max for x in (0.2, 0.4, 0.7, 1.2)],
                "rate_grid": [0.5, 1.0, 2.0],
            }
            n_obs = u.shape[1]
            sub = torch.arange(0, n_obs, max(1, n_obs // 300), device=u.device)
            p = _em.grid_onset(data.take_cells(sub), init.params, t_cells[:, sub], init.ratio, **grid)
            mom = _em.moments(data)
            step = torch.full_like(p.alpha, float(np.log(1.5)))
            p, _, _ = _em.m_step(data, mom, p, t_cells, init.ratio, step, n_rounds=4, fit_t_on=True)
            ut, st = _em.curve(t_cells, p)
            switches = torch.ones(p.alpha.shape[0], dtype=torch.bool, device=u.device)
            if self.switch_off is not True:
                # induced from the onset on (no switch-off)
                tau = (t_cells - p.t_on).clamp(min=0)
                ut_n, st_n = kinetics.solution(tau, 0.0, 0.0, p.alpha, p.beta, p.gamma, xp=torch)
                if self.switch_off is False:
                    switches[:] = False
                else:  # "per_gene": the switch where it fits the cells clearly better
                    fit_sw = _curve_sse(u, s, p.scaling * ut, st, data, free_rate=self.variant == "full")
                    fit_ns = _curve_sse(u, s, p.scaling * ut_n, st_n, data, free_rate=self.variant == "full")
                    switches = fit_sw < _SWITCH_GAIN * fit_ns
                keep = switches[:, None]
                ut, st = torch.where(keep, ut, ut_n), torch.where(keep, st, st_n)
            cu, cs = p.scaling * ut, st
            rho = None
            if self.variant == "full":
                # the trajectory from (0, 0) is linear in alpha, so each cell's best rate
                # factor is a least-squares ratio (in units of each gene's spread); the
                # gene's alpha is rescaled so that its expressing cells reach rho = 1
                # (a lineage-specific gene fitted on all cells gets too small an alpha)
                wu = 1 / data.std_u**2
                ws = 1 / data.std_s**2
                den = cu * cu * wu + cs * cs * ws
                rho_raw = (u * cu * wu + s * cs * ws) / den.clamp(min=1e-12)
                weight = den / den.amax(1, keepdim=True).clamp(min=1e-12)
                informative = weight > 0.05
                q = _em.masked_quantile(rho_raw, informative, 0.95)
                q = torch.where(q > 0, q, torch.ones_like(q)).clamp(0.1, 10.0)
                p = p.replace(alpha=p.alpha * q)
                rho_raw = rho_raw / q
                cu, cs = cu * q, cs * q
                rho_fit = rho_raw.clamp(0, 1)
                # the noise is that of the curve with each cell's rate factor
                cu, cs = cu * rho_fit, cs * rho_fit
                rho = (rho_fit.T.float().cpu().numpy(), (weight * informative).T.float().cpu().numpy())
            res_u = (u - cu).double()
            res_s = (s - cs).double()
            sigma_u = res_u.pow(2).mean(1).sqrt()
            sigma_s = res_s.pow(2).mean(1).sqrt()
        return p, switches, (sigma_u, sigma_s), rho

    def _capture_agreement(
        self, adata: AnnData, data: Any, init: Any, cols: np.ndarray, capture: np.ndarray
    ) -> float:
        """Spearman correlation of the capture times with the steady-state fit's latent time.

        A warning below ``_CAPTURE_MIN_AGREEMENT``: capture times that do not follow the
        cells' own order (every stage captured at every time) pin each cell near its capture
        time, and the state then explains what the time should. NaN without a kNN graph.
        """
        if Key.obsp.CONNECTIVITIES not in adata.obsp:
            return float("nan")
        t_ss, _, _ = self._steady_state_time(adata, data, init, cols)
        agreement = latent_time_spearman(t_ss, capture)
        if agreement < _CAPTURE_MIN_AGREEMENT and not self._quiet:
            logger.warning(
                "velovae: the capture times in obs[%r] agree poorly with the order of the cells' own "
                "expression (Spearman %.2f with the steady-state fit's latent time; expected at least "
                "%.2f, as capture times that follow differentiation do). Where every stage is captured "
                "at every time (animals of two ages with ongoing neurogenesis, for instance), the prior "
                "holds each cell near its capture time, the cell state explains the rest and the "
                "velocities can all but vanish. Fit without time_key as well and compare "
                "(model.initial_time_ holds this correlation).",
                self.time_key,
                agreement,
                _CAPTURE_MIN_AGREEMENT,
            )
        return agreement

    def _initial_time(
        self, adata: AnnData, data: Any, init: Any, cols: np.ndarray
    ) -> tuple[np.ndarray, str, float]:
        """``(n_obs,)`` initial time in [0, 1], which time it is, and DPT's agreement.

        The steady-state fit's latent time, or DPT from its root; DPT is used only where its
        Spearman correlation with the steady-state time is at least ``_DPT_MIN_AGREEMENT``,
        else the steady-state time, with a warning. Returns the time, ``"dpt"`` or
        ``"steady_state"``, and that correlation (NaN with ``initial_time="steady_state"``),
        which :meth:`_initialize` records in ``self.initial_time_``. Both times are computed
        either way: where DPT is a clock (the same agreement), each cell's rank distance
        between them is kept for ``obs['latent_time_start_spread']``.
        """
        if self._times is None:
            t_ss, root_score, order = self._steady_state_time(adata, data, init, cols)
            t_dpt = diffusion_pseudotime(adata, int(lt_mod.earliest_roots(root_score, t_ss)[0][0]))
            self._times = (t_ss, order, t_dpt)
        t_ss, order, t_dpt = self._times
        agreement = latent_time_spearman(t_dpt, t_ss)
        self._dpt_agreement = agreement  # whichever start is asked for (read by a second start)
        dpt_is_clock = agreement >= _DPT_MIN_AGREEMENT
        if dpt_is_clock:
            self._start_spread = start_spread(t_ss, t_dpt)
        if self.initial_time == "steady_state":
            return t_ss, "steady_state", float("nan")
        if dpt_is_clock:
            return t_dpt, "dpt", agreement
        # the cells tied at the steady-state time's start, spread in their gene clocks' order: on
        # the benchmark's 2,000-cell simulation a sixth of the cells (true time 0.1-4.5 of 20) sat
        # at 0, and with some seeds the fit ordered them backwards (README, "Seeds, side by side")
        self._tied_at_start = float(tied_at_start(t_ss).mean())
        (logger.debug if self._quiet else logger.warning)(
            "velovae: the initial time is to be diffusion pseudotime (initial_time='dpt'), but it "
            "disagrees with the steady-state fit's latent time (Spearman %.2f, expected at least "
            "%.2f): the cells' expression does not move away from the root monotonically (genes "
            "that switch off return towards it). Starting from the steady-state time instead, its "
            "%.1f%% of cells tied at the start spread in the order of their gene times "
            "(model.initial_time_).",
            agreement,
            _DPT_MIN_AGREEMENT,
            100 * self._tied_at_start,
        )
        return untie_start(t_ss, order), "steady_state", agreement

    def _steady_state_time(
        self, adata: AnnData, data: Any, init: Any, cols: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(n_obs,)`` initial time in [0, 1] from the steady-state fit, the root-cell score and an order.

        The order is each cell's mean gene time (ranked and smoothed over neighbours, as the
        latent time combines them), which :func:`untie_start` orders the tied cells by.
        """
        import torch

        from explorer.models import _em

        ss = SteadyState(use_highly_variable=False).fit(adata)
        vel = ss.velocity[:, cols]
        use = np.asarray(ss.velocity_genes, dtype=bool)[cols] & np.isfinite(vel).all(0)
        if use.sum() < 2:
            use = np.isfinite(vel).all(0)
        del ss  # its velocities of every gene
        conn = adata.obsp[Key.obsp.CONNECTIVITIES]
        # above 20,000 cells, the dynamical model's root cells: the direct kNN's velocity
        # graph and a fixed number of backward-chain steps (the eigen solve took 128 s of a
        # 187 s initial time at 100,000 cells); at and below it, scVelo's
        large = adata.n_obs > _LARGE_GRAPH_CELLS
        if Key.obsp.DISTANCES in adata.obsp:
            pattern = neighbors_for_graph(adata, n_recurse_neighbors=_graph_recursion(large))
        else:
            pattern = sparse.csr_matrix(conn)
        t_bwd = lt_mod.transitions_backward_from_velocity(
            _dense32(adata.layers[Key.layers.MS][:, cols[use]]), vel[:, use], pattern
        )
        del pattern, vel
        steps = _LARGE_GRAPH_POWER_STEPS if large else None
        roots = lt_mod.root_cells(t_bwd, conn, seed=self.seed, n_power_steps=steps)
        del t_bwd
        # each gene's own time only now, and of the genes used only (the assignment's three
        # (genes, cells) arrays and every gene's float64 times were held through the graph,
        # 0.4 GB at 100,000 cells and 200 genes)
        a = _em.assign(data, init.params, n_newton=2)
        finite = torch.isfinite(a.t).all(1).cpu().numpy()
        genes = finite & use
        if genes.sum() < 2:
            genes = finite
        gene_t = a.t[torch.from_numpy(genes).to(a.t.device)].T.contiguous().double().cpu().numpy()
        del a
        # lt_mod.latent_time's two halves, to keep the gene clocks' mean for untie_start
        clocks = lt_mod.gene_clock_times(gene_t, conn)
        del gene_t
        order = clocks.times.mean(1)
        t = np.asarray(lt_mod.latent_time_from_gene_times(clocks, roots, conn), dtype=np.float64)
        return t, np.asarray(roots, dtype=np.float64), order

    # ------------------------------------------------------------------------------ training

    def _batches(self, idx: np.ndarray, generator: torch.Generator) -> list[np.ndarray]:
        import torch

        perm = idx[torch.randperm(len(idx), generator=generator).numpy()]
        bs = self.batch_size
        batches = [perm[i : i + bs] for i in range(0, len(perm), bs)]
        # batch norm needs two cells: fold a last single cell into the batch before it
        if len(batches) > 1 and len(batches[-1]) < 2:
            batches[-2] = np.concatenate([batches[-2], batches.pop()])
        return batches

    def _warmup(self, run: _Run, t_init: np.ndarray) -> None:
        """Pull the encoder's time towards the initial time, so that the ELBO starts from it."""
        import torch

        module, tensors = run.module, run.tensors
        device = tensors.u.device
        target = torch.from_numpy(t_init.astype(np.float32)[:, None]).to(device)
        net = list(module.encoder.parameters())
        rho_init = getattr(self, "_rho_init", None)
        if module.dim_c and rho_init is not None:
            # and the cell state and decoder from each cell's initial rate factors
            rho_t = torch.from_numpy(rho_init[0]).to(device)
            rho_w = torch.from_numpy(rho_init[1]).to(device)
            net += [*module.c_head.parameters(), *module.decoder.parameters(), *module.rho_head.parameters()]
        else:
            rho_t = rho_w = None
        opt = _adam(net, lr=self.learning_rate * 5)
        head = _adam(module.t_head.parameters(), lr=self.learning_rate * 50)
        scale = self.t_max * 0.05

        def loss_of(bt: torch.Tensor) -> torch.Tensor:
            q = module.encode(tensors.x(bt))
            loss = (((q.t_mean - target[bt]) / scale) ** 2).mean()
            if rho_t is not None:
                w = rho_w[bt]
                rho = module.rho(q.c_mean, len(bt))
                fit = (w * (rho - rho_t[bt]) ** 2).sum() / w.sum().clamp(min=1e-12)
                loss = loss + fit * _RHO_WARMUP_WEIGHT
            return loss

        module.train()
        for epoch in range(self.n_warmup_epochs):
            total_loss = self._minibatch_epoch(run, loss_of, [opt, head])
            run.history["warmup"].append(total_loss / len(run.train_idx))
            run.advance(f"warm start {epoch + 1}/{self.n_warmup_epochs}")

    def _stage1(self, run: _Run) -> None:
        """Stage 1: the negative ELBO, network and ODE together, until the held-out ELBO converges."""
        module, tensors, test_idx, history = run.module, run.tensors, run.test_idx, run.history

        def loss_of(bt: torch.Tensor) -> torch.Tensor:
            prior = (tensors.prior_mean[bt], tensors.prior_sd[bt])
            return module.loss(tensors.x(bt), tensors.u[bt], tensors.s[bt], prior)[0]

        opt = _adam(module.network_parameters(), lr=self.learning_rate)
        opt_ode = _adam(module.ode_parameters(), lr=self.learning_rate * 8)
        for epoch in range(self.max_epochs):
            module.train()
            train_loss = self._minibatch_epoch(run, loss_of, [opt, opt_ode])
            history["stage1_train"].append(-train_loss / len(run.train_idx))
            if self._sigma_every and (epoch + 1) % self._sigma_every == 0:
                # the per-gene noise is the likelihood's MLE at the current fit: fixed at the
                # initial fit's residuals, genes the initial fit misses badly (the pancreas'
                # hormone genes, sigma 9-15 counts) would keep a weight 1,500-4,500x below
                # the median gene's and never be fitted
                post = self._posterior(module, tensors)
                dec = self._decode_all(module, post["t_mean"], post.get("c_mean"), None, _PREDICTED)
                self._update_sigma(module, tensors, dec, run.train_idx)
                ru = tensors.u[test_idx] - dec.u[test_idx]
                rs = tensors.s[test_idx] - dec.s[test_idx]
                history["stage1_mse_test"].append(float((ru * ru + rs * rs).mean()))
            elbo = self._held_out_elbo(module, tensors, test_idx)
            history["stage1"].append(elbo)
            run.advance(f"stage 1 epoch {epoch + 1}: held-out ELBO {elbo:.1f}")
            if self._converged(history["stage1"]):
                break

    def _minibatch_epoch(
        self,
        run: _Run,
        loss_of: Callable[[torch.Tensor], torch.Tensor],
        optimizers: list[torch.optim.Optimizer],
        *,
        min_batch: int = 2,
    ) -> float:
        """One pass over the training cells in seeded minibatches: each batch's ``loss_of(cells)``
        minimised by one step of every optimizer (batches under ``min_batch`` cells skipped:
        batch normalisation needs two). Returns the sum over batches of loss x batch size.
        """
        import torch

        total = 0.0
        for b in self._batches(run.train_idx, run.generator):
            if len(b) < min_batch:
                continue
            loss = loss_of(torch.from_numpy(b).to(run.tensors.u.device))
            for opt in optimizers:
                opt.zero_grad()
            loss.backward()
            for opt in optimizers:
                opt.step()
            total += float(loss.detach()) * len(b)
        return total

    def _converged(self, values: list[float]) -> bool:
        """Whether the last ``patience`` epochs improved on the ``patience`` before by less than ``tol``.

        Means over windows, not single epochs: the minibatch noise of one epoch's ELBO
        is larger than the slow gains late in training.
        """
        w = self.patience
        if len(values) < 2 * w:
            return False
        recent, before = float(np.mean(values[-w:])), float(np.mean(values[-2 * w : -w]))
        return recent - before <= self.tol * abs(before)

    def _held_out_elbo(
        self,
        module: VAEModule,
        tensors: _Tensors,
        idx: np.ndarray,
        x0: InitialState | None = None,
        *,
        t: torch.Tensor | None = None,
    ) -> float:
        """Mean ELBO per cell of ``idx`` at the posterior means (eval mode).

        With ``t`` (every cell's time, ``(n_obs, 1)``), the state's ELBO at that time
        (:meth:`VAEModule.state_loss`, the state stage's score) instead of the full one.
        """
        import torch

        module.eval()
        total = 0.0
        with torch.inference_mode():
            for start in range(0, len(idx), _CHUNK):
                bt = torch.from_numpy(idx[start : start + _CHUNK]).to(tensors.u.device)
                if t is not None:
                    x, u, s = tensors.x(bt), tensors.u[bt], tensors.s[bt]
                    _, elbo = module.state_loss(x, u, s, t[bt], sample=False)
                else:
                    sub = None if x0 is None else _take(x0, bt)
                    _, elbo = module.loss(
                        tensors.x(bt), tensors.u[bt], tensors.s[bt],
                        (tensors.prior_mean[bt], tensors.prior_sd[bt]), x0=sub, sample=False,
                    )  # fmt: skip
                total += float(elbo.sum())
        return total / max(len(idx), 1)

    def _posterior(self, module: VAEModule, tensors: _Tensors) -> dict[str, torch.Tensor]:
        """Posterior means and standard deviations of every cell (eval mode, in chunks)."""
        import torch

        module.eval()
        parts: dict[str, list[torch.Tensor]] = {"t_mean": [], "t_sd": [], "c_mean": [], "c_sd": []}
        with torch.inference_mode():
            for start in range(0, tensors.u.shape[0], _CHUNK):
                q = module.encode(tensors.x(slice(start, start + _CHUNK)))
                parts["t_mean"].append(q.t_mean)
                parts["t_sd"].append(q.t_sd)
                if q.c_mean is not None:
                    parts["c_mean"].append(q.c_mean)
                    parts["c_sd"].append(q.c_sd)
        return {k: torch.cat(v) for k, v in parts.items() if v}

    def _reread_time(
        self, module: VAEModule, tensors: _Tensors, post: dict[str, torch.Tensor], train_idx: np.ndarray
    ) -> dict[str, torch.Tensor]:
        """``time_posterior="final"``: each cell's time posterior read again on the final curves.

        :meth:`_refine_time`'s grid with the model as the state stage and the polish left
        it and each cell's own state, at stage 1's temperature (the final residuals' own
        is lower, 3-16 against 8-28 on simulations, and its intervals narrower still). The
        encoder's time stays in ``t_mean_encoder`` / ``t_sd_encoder``, and
        ``self.time_temperature_`` records ``"reread": "final"``.
        """
        stage1 = dict(self.time_temperature_)
        out = self._refine_time(module, tensors, post, train_idx, fixed_temperature=stage1["temperature"])
        out["t_mean_encoder"], out["t_sd_encoder"] = post["t_mean_encoder"], post["t_sd_encoder"]
        self.time_temperature_ = {**stage1, "reread": "final"}
        return out

    def _refine_time(
        self,
        module: VAEModule,
        tensors: _Tensors,
        post: dict[str, torch.Tensor],
        train_idx: np.ndarray,
        *,
        fixed_temperature: float | None = None,
    ) -> dict[str, torch.Tensor]:
        """Each cell's time posterior on a grid, given its state ``c`` and the fitted ODE.

        The encoder's Gaussian ``q(t | u, s)`` is an amortised approximation: on a
        two-lineage simulation its mean ordered cells by true time with Spearman 0.87
        while the exact one-dimensional posterior of the same fit (state and ODE fixed)
        gave 0.96, and 0.98 tempered as below. Here the posterior of ``t`` is evaluated
        on ``_T_GRID`` points spanning the encoder's times (plus a margin), with the
        time prior.

        The likelihood treats the ``2 G`` values of a cell as independent given
        ``(t, c)``, but the fit's residuals are correlated across genes (a misfit of the
        ODE moves many genes together), so the untempered posterior is far too narrow;
        as for a composite likelihood (Pauli, Racugno & Ventura 2011; Ribatet, Cooley &
        Davison 2012) the log-likelihood is divided by a temperature. With
        ``time_temperature="participation"`` (the default) it is ``2 G / n_eff``, where
        ``n_eff`` is the participation ratio ``(sum lambda)^2 / sum lambda^2`` of the
        eigenvalues of the standardised training residuals' covariance: the number of
        independent directions the residuals actually have. With ``"bootstrap"`` it is
        calibrated by a residual bootstrap (:meth:`_bootstrap_temperature`):
        synthetic cells at known model times, each the fitted prediction at a training
        cell's time and state plus the whole residual vector of another training cell
        (which keeps the residuals' correlation across genes), and the smallest
        temperature at which their nominal 90 % intervals cover 90 % of those times.
        Neither uses a true time. The bootstrap's temperature was 3-17x lower than the
        participation ratio's on simulations, and the true times' coverage lower: noise
        like the residuals accounts for little of the time error (see ``time_temperature``).

        Returns ``post`` with ``t_mean`` and ``t_sd`` replaced by the grid posterior's
        moments, and the encoder's in ``t_mean_encoder`` / ``t_sd_encoder``; the
        temperature is in ``self.time_temperature_``. ``fixed_temperature``, when given, is
        used instead of either method's (:meth:`_reread_time`).
        """
        import torch

        t_enc, c = post["t_mean"], post.get("c_mean")
        n_genes = tensors.u.shape[1]
        if fixed_temperature is not None:
            n_eff, participation = float("nan"), float(fixed_temperature)
        else:
            n_eff, participation = self._residual_temperature(module, tensors, t_enc, c, train_idx)
        lo, hi = float(t_enc.min()), float(t_enc.max())
        margin = _T_GRID_MARGIN * max(hi - lo, 1e-3 * self.t_max)
        grid = torch.linspace(lo - margin, hi + margin, _T_GRID, device=t_enc.device)
        # the untempered log-likelihood of every cell at every grid point, once: any
        # temperature's posterior is then a softmax of it
        loglik = self._grid_loglik(module, tensors.u, tensors.s, c, grid)
        log_prior = -0.5 * ((grid[None, :] - tensors.prior_mean) / tensors.prior_sd) ** 2
        floor = float(grid[1] - grid[0]) / 2  # the grid's spacing bounds the SD's resolution
        self.time_temperature_ = {
            "method": self.time_temperature,
            "n_eff": n_eff,
            "n_features": 2 * n_genes,
            "participation": participation,
        }
        temperature = participation
        if fixed_temperature is None and self.time_temperature == "bootstrap":
            mean, _ = _grid_moments(loglik, log_prior, grid, participation)
            temperature, info = self._bootstrap_temperature(
                module, tensors, c, mean, train_idx, grid, log_prior, floor
            )
            self.time_temperature_.update(info)
        self.time_temperature_["temperature"] = temperature
        mean, sd = _grid_moments(loglik, log_prior, grid, temperature)
        out = dict(post)
        out["t_mean_encoder"], out["t_sd_encoder"] = t_enc, post["t_sd"]
        out["t_mean"] = mean[:, None]
        out["t_sd"] = sd.clamp(min=floor)[:, None]
        return out

    def _residual_temperature(
        self,
        module: VAEModule,
        tensors: _Tensors,
        t: torch.Tensor,
        c: torch.Tensor | None,
        train_idx: np.ndarray,
    ) -> tuple[float, float]:
        """``(n_eff, 2 G / n_eff)`` of the training cells' standardised residuals at ``(t, c)``."""
        import torch

        dec = self._decode_all(module, t, c, None, _PREDICTED)
        idx = torch.from_numpy(train_idx).to(t.device)
        n_genes = tensors.u.shape[1]
        with torch.inference_mode():
            # the training cells' standardised residuals, centred, made in place and the
            # predictions dropped once read (the same numbers; at 100,000 cells the
            # temporaries beside them were 0.5 GB)
            r = torch.cat([tensors.u[idx], tensors.s[idx]], 1)
            r[:, :n_genes].sub_(dec.u[idx]).div_(module.sigma_u)
            r[:, n_genes:].sub_(dec.s[idx]).div_(module.sigma_s)
            del dec
            r64 = r.sub_(r.mean(0)).double()
            del r
            return _participation_temperature(r64)

    def _grid_loglik(
        self, module: VAEModule, u: torch.Tensor, s: torch.Tensor, c: torch.Tensor | None, grid: torch.Tensor
    ) -> torch.Tensor:
        """``(n, len(grid))`` log-likelihood of each cell's ``(u, s)`` at each grid time, its state fixed.

        Through :meth:`VAEModule.grid_log_likelihood` (two matrix products per chunk, not a
        decode per grid time): on the pancreas the time grid fell from 12-14 s to about 1 s
        with the same times (within 6e-6) and SDs (within 1e-5, relative).
        """
        import torch

        n = u.shape[0]
        module.eval()
        parts = []
        with torch.inference_mode():
            for start in range(0, n, _CHUNK // 4):
                sl = slice(start, min(start + _CHUNK // 4, n))
                m = sl.stop - sl.start
                cc = None if c is None else c[sl]
                rho = module.rho(cc, m)  # the state is fixed along the grid: decode it once
                parts.append(module.grid_log_likelihood(u[sl], s[sl], rho, grid))
        return torch.cat(parts)

    def _bootstrap_temperature(
        self,
        module: VAEModule,
        tensors: _Tensors,
        c: torch.Tensor | None,
        t_fit: torch.Tensor,
        train_idx: np.ndarray,
        grid: torch.Tensor,
        log_prior: torch.Tensor,
        floor: float,
    ) -> tuple[float, dict[str, float]]:
        """The smallest temperature at which synthetic cells' 90 % intervals cover 90 % of their times.

        A residual bootstrap (Efron & Tibshirani 1993, ch. 9, resampling residuals of a
        fitted model): each of up to ``_N_SYNTHETIC`` synthetic cells takes a training
        cell's fitted time ``t*`` (``t_fit``, the grid posterior at the participation
        ratio's temperature) and state, the model's prediction there, and adds the whole
        residual vector (all genes, ``u`` and ``s``) of another training cell at its own
        fitted time. Its posterior on the same grid, with the first cell's prior, is
        evaluated at temperatures on a log grid from 1 up, and the smallest whose
        ``mean ± z90 SD`` covers ``t*`` in 90 % of synthetic cells is returned (the
        largest tried if none does).
        """
        import torch

        g = np.random.default_rng(self.seed + 2)
        n_syn = min(_N_SYNTHETIC, len(train_idx))
        cell = torch.from_numpy(g.choice(train_idx, n_syn)).to(grid.device)
        donor = torch.from_numpy(g.choice(train_idx, n_syn)).to(grid.device)
        fit = self._decode_all(module, t_fit[:, None], c, None, _PREDICTED)
        t_star = t_fit[cell]
        c_syn = None if c is None else c[cell]
        u_syn = fit.u[cell] + (tensors.u[donor] - fit.u[donor])
        s_syn = fit.s[cell] + (tensors.s[donor] - fit.s[donor])
        loglik = self._grid_loglik(module, u_syn, s_syn, c_syn, grid)
        prior = log_prior[cell]
        temps = np.geomspace(1.0, _MAX_TEMPERATURE, _N_TEMPERATURES)
        coverage = np.empty(len(temps))
        for k, temp in enumerate(temps):
            mean, sd = _grid_moments(loglik, prior, grid, float(temp))
            coverage[k] = float(((mean - t_star).abs() <= _Z90 * sd.clamp(min=floor)).float().mean())
        ok = np.flatnonzero(coverage >= _LEVEL)
        k = int(ok[0]) if len(ok) else len(temps) - 1
        return float(temps[k]), {"synthetic_coverage": float(coverage[k]), "n_synthetic": n_syn}

    def _decode_all(
        self,
        module: VAEModule,
        t: torch.Tensor,
        c: torch.Tensor | None,
        x0: InitialState | None,
        fields: tuple[str, ...] = _DECODED,
    ) -> Any:
        """:meth:`VAEModule.decode` of all cells (eval mode), the ``fields`` kept: :func:`_decode_chunks`."""
        module.eval()

        def decode(sl: slice) -> Any:
            return module.decode(t[sl], None if c is None else c[sl], _take(x0, sl))

        return _decode_chunks(t.shape[0], decode, fields)

    def _x0_index(self, t: np.ndarray, c: np.ndarray, train_idx: np.ndarray) -> np.ndarray:
        """``(n_obs, k)`` training cells just before each cell in time and nearest in cell state.

        Among the ``_X0_WINDOW`` training cells immediately preceding the cell's time
        (the earliest cells take the first ones), the ``_X0_NEIGHBORS`` closest in ``c``:
        the paper's "cells just before each cell's time" with a similar state, so that a
        cell of one lineage never starts from another lineage's cells.
        """
        order = train_idx[np.argsort(t[train_idx], kind="stable")]
        t_sorted = t[order]
        w = min(_X0_WINDOW, len(order))
        k = min(_X0_NEIGHBORS, w)
        pos = np.searchsorted(t_sorted, t, side="left")
        start = np.clip(pos - w, 0, len(order) - w)
        window = order[start[:, None] + np.arange(w)[None, :]]  # (n_obs, w)
        d = ((c[window] - c[:, None, :]) ** 2).sum(-1)
        # a cell is never its own start
        d[window == np.arange(len(t))[:, None]] = np.inf
        near = np.argpartition(d, k - 1, axis=1)[:, :k]
        return np.take_along_axis(window, near, axis=1)

    def _stage2(self, run: _Run, post: dict[str, torch.Tensor]) -> InitialState | None:
        """The paper's second stage: initial states from earlier cells, ODE fine-tuned with ``(t, c)`` fixed.

        Returns the initial states, or ``None`` where stage 1's fit is kept.
        """
        import torch

        from explorer.models._vae_module import InitialState

        module, tensors, history = run.module, run.tensors, run.history
        train_idx, test_idx = run.train_idx, run.test_idx
        t = post["t_mean"]
        c = post["c_mean"]
        nbr = self._x0_index(t[:, 0].cpu().numpy(), c.cpu().numpy(), train_idx)
        nbr_t = torch.from_numpy(nbr).to(t.device)

        def neighbour_mean(x: torch.Tensor) -> torch.Tensor:
            # a chunk of cells at a time: all cells' neighbours' rows at once were
            # (n_obs, k, G), 0.8 GB at 100,000 cells and 200 genes
            out = x.new_empty(x.shape)
            for start in range(0, x.shape[0], _CHUNK):
                out[start : start + _CHUNK] = x[nbr_t[start : start + _CHUNK]].mean(1)
            return out

        def initial_state(dec: Any) -> InitialState:
            return InitialState(neighbour_mean(dec.u), neighbour_mean(dec.s), t[nbr_t, 0].mean(1, keepdim=True))

        # start from the stage-1 predictions, and re-estimate the noise from them
        dec = self._decode_all(module, t, c, None, _PREDICTED)
        self._update_sigma(module, tensors, dec, train_idx)
        x0 = initial_state(dec)
        # the initial states stay fixed (velovae recomputes them rarely): recomputing them
        # every epoch from predictions that start from them drifts (on a 300-cell
        # simulation the held-out log-likelihood fell by 19 in three epochs)

        def held_out(x0_: InitialState | None) -> tuple[float, float]:
            return self._held_out_fit(module, tensors, t, c, x0_, test_idx)

        stage1_score, stage1_mse = held_out(None)
        stage1_state = copy.deepcopy(module.state_dict())
        best_score, best_mse = held_out(x0)
        best_state = copy.deepcopy(module.state_dict())
        params = [*module.decoder.parameters(), *module.rho_head.parameters()]
        opt = _adam(params, lr=self.learning_rate)
        rates = [module.log_alpha, module.log_beta, module.log_gamma, module.log_scaling]
        opt_ode = _adam(rates, lr=self.learning_rate * 8)
        for epoch in range(self.max_epochs_stage2):
            self._fixed_time_epoch(run, t, c, x0, [opt, opt_ode])
            score, mse = held_out(x0)
            history["stage2"].append(score)
            if score > best_score:
                best_score, best_mse, best_state = score, mse, copy.deepcopy(module.state_dict())
            run.advance(f"stage 2 epoch {epoch + 1}: held-out log-likelihood {score:.1f}")
            if self._converged(history["stage2"]):
                break
            if epoch + 1 >= self.patience and best_score <= stage1_score:
                # it would not be kept (below): on the pancreas its held-out log-likelihood
                # stayed below stage 1's for all 99 epochs (106 s of 274); after the polish
                # it started 217 below and gained 2-11 an epoch (1,889 -> 1,932 in 10
                # epochs against 2,106), so one convergence window (patience) decides it
                break
        history["stage2_vs_stage1"] = [stage1_score, best_score]
        history["stage2_vs_stage1_mse"] = [stage1_mse, best_mse]
        if best_score <= stage1_score or best_mse > stage1_mse:
            # the second stage did not help on held-out cells: keep the first stage's fit.
            # The MSE too: on the pancreas stage 2 raised the held-out log-likelihood by
            # 19-29 per cell (the many low-noise genes) while it raised the held-out MSE
            # from 1.6 to 2.3-2.6 (the hormone genes, at hundreds of counts; learning
            # rate 1e-3)
            logger.info(
                "velovae: stage 2 held-out log-likelihood %.2f (stage 1 %.2f), MSE %.3f (stage 1 %.3f); "
                "keeping stage 1",
                best_score,
                stage1_score,
                best_mse,
                stage1_mse,
            )
            module.load_state_dict(stage1_state)
            return None
        module.load_state_dict(best_state)
        return x0

    def _held_out_fit(
        self,
        module: VAEModule,
        tensors: _Tensors,
        t: torch.Tensor,
        c: torch.Tensor | None,
        x0: InitialState | None,
        test_idx: np.ndarray,
    ) -> tuple[float, float]:
        """Mean held-out log-likelihood and MSE of the predictions at the fixed ``(t, c)``, from ``x0``."""
        import torch

        # decode the held-out cells only (a whole-data decode cost 3x this, every epoch)
        idx = torch.from_numpy(test_idx).to(t.device)
        d = self._decode_all(module, t[idx], None if c is None else c[idx], _take(x0, idx), _PREDICTED)
        u, s = tensors.u[idx], tensors.s[idx]
        with torch.inference_mode():
            ll = module.log_likelihood(u, s, d)
            mse = ((u - d.u) ** 2 + (s - d.s) ** 2).mean()
        return float(ll.mean()), float(mse)

    def _fixed_time_epoch(
        self,
        run: _Run,
        t: torch.Tensor,
        c: torch.Tensor | None,
        x0: InitialState | None,
        optimizers: list[torch.optim.Optimizer],
    ) -> None:
        """One epoch of maximum likelihood at the fixed ``(t, c)`` (from ``x0``), the encoder frozen.

        ``optimizers`` hold the parameters trained.
        """
        module, tensors = run.module, run.tensors

        def loss_of(bt: torch.Tensor) -> torch.Tensor:
            d = module.decode(t[bt], None if c is None else c[bt], _take(x0, bt))
            return -module.log_likelihood(tensors.u[bt], tensors.s[bt], d).mean()

        module.train()
        module.encoder.eval()
        self._minibatch_epoch(run, loss_of, optimizers)

    def _stage1_c_prior_sd(self) -> float:
        """The cell state's prior SD while the time is learned (stage 1)."""
        return self.c_prior_sd if self.time_c_prior_sd is None else float(self.time_c_prior_sd)

    def _state_stage_runs(self) -> bool:
        """Whether the state is re-learned under ``c_prior_sd`` after the time (full model only)."""
        return self.variant == "full" and self._stage1_c_prior_sd() != self.c_prior_sd

    def _state_stage(self, run: _Run, post: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The cell state re-learned under its prior ``N(0, c_prior_sd^2 I)``, each cell's time fixed.

        Stage 1 learns the time with the state's prior at ``time_c_prior_sd`` (0.01, the
        ``velovae`` package's): held near the others', a cell's state cannot take over
        what its time should explain. With each cell's time fixed at its grid posterior
        mean, the encoder's state, the ``rho`` decoder and the rates (not the onsets and
        switch-offs, under which the grid read the times) are then trained on the state's
        ELBO (:meth:`VAEModule.state_loss`) under the prior ``c_prior_sd`` (1, the
        paper's), at ``_STATE_LR_FACTOR`` x stage 1's learning rates, the noise
        re-estimated every ``_sigma_every`` epochs, until the held-out ELBO converges (the
        stages' rule). The time and its SD stay the grid's; the
        state's mean and SD are the retrained encoder's. Returns ``post`` with the new
        state.
        """
        from explorer.models._vae_module import ODE_LR_FACTOR

        module, tensors, history = run.module, run.tensors, run.history
        module.c_prior_sd = float(self.c_prior_sd)
        t = post["t_mean"]
        params = [
            *module.encoder.parameters(),
            *module.c_head.parameters(),
            *module.decoder.parameters(),
            *module.rho_head.parameters(),
        ]
        lr = self.learning_rate * _STATE_LR_FACTOR
        opt = _adam(params, lr=lr)
        # the rates only: the onsets and switch-offs stay stage 1's, under which the grid
        # read each cell's time (moving them put the pancreas' Delta cells after Sst's
        # switch-off, every one with negative Sst velocity)
        opt_ode = _adam(module.rate_parameters(), lr=lr * ODE_LR_FACTOR)

        def loss_of(bt: torch.Tensor) -> torch.Tensor:
            return module.state_loss(tensors.x(bt), tensors.u[bt], tensors.s[bt], t[bt])[0]

        for epoch in range(self.max_epochs):
            module.train()
            self._minibatch_epoch(run, loss_of, [opt, opt_ode])
            if self._sigma_every and (epoch + 1) % self._sigma_every == 0:
                state = self._posterior(module, tensors)
                dec = self._decode_all(module, t, state["c_mean"], None, _PREDICTED)
                self._update_sigma(module, tensors, dec, run.train_idx)
            score = self._held_out_elbo(module, tensors, run.test_idx, t=t)
            history["state"].append(score)
            run.advance(f"state epoch {epoch + 1}: held-out ELBO {score:.1f}")
            if self._converged(history["state"]):
                break
        state = self._posterior(module, tensors)
        out = dict(post)
        out["c_mean"], out["c_sd"] = state["c_mean"], state["c_sd"]
        return out

    def _polish(self, run: _Run, post: dict[str, torch.Tensor]) -> None:
        """The ODE parameters and the ``rho`` head refitted at each cell's refined ``(t, c)``.

        Stage 1 fits the kinetics at the encoder's sampled times; :meth:`_refine_time`
        then moves each cell's time to its posterior mean given the fitted ODE. Here the
        rates, onsets, switches and the last layer of the ``rho`` decoder are fitted by
        maximum likelihood at those times (fixed, as the paper's second stage fixes them,
        but from ``(0, 0)`` as in stage 1), the noise re-estimated every
        ``_sigma_every`` epochs. The decoder's hidden layers stay as stage 1 left them,
        in eval mode, so their features of ``c`` are computed once and what is trained
        is what the predictions use (no dropout); with time, state and features fixed
        every gene is its own small regression, so the learning rates are
        ``_POLISH_LR_FACTOR`` x stage 1's, annealed to 0 over ``max_epochs_polish``
        epochs (cosine; at a constant rate the minibatches' noise kept the held-out MSE
        jumping), all of which run. Kept at the epoch with the best held-out
        log-likelihood among those whose held-out MSE is not above the start's (as
        stage 2), or not at all.
        """
        import torch

        from explorer.models._vae_module import ODE_LR_FACTOR

        module, tensors, history = run.module, run.tensors, run.history
        train_idx, test_idx = run.train_idx, run.test_idx
        t, c = post["t_mean"], post.get("c_mean")
        n_genes = int(module.log_alpha.shape[0])
        module.eval()
        features = None
        if module.dim_c and c is not None:
            with torch.inference_mode():
                chunks = range(0, c.shape[0], _CHUNK)
                features = torch.cat([module.decoder(c[i : i + _CHUNK]) for i in chunks])
            features = features.clone()  # out of inference mode, so autograd can use it

        def rho_of(idx: Any) -> Any:
            if features is None:
                return module.rho(None, len(t[idx]))
            return torch.sigmoid(module.rho_head(features[idx]))

        def decode(idx: Any) -> Any:
            return module.decode(t[idx], None, None, rho=rho_of(idx))

        def decode_all() -> Any:
            return _decode_chunks(t.shape[0], decode, _PREDICTED)

        def held_out() -> tuple[float, float]:
            ll = sq = 0.0
            with torch.no_grad():
                for i in range(0, len(test_idx), _CHUNK):
                    bt = torch.from_numpy(test_idx[i : i + _CHUNK]).to(t.device)
                    d = decode(bt)
                    u, s = tensors.u[bt], tensors.s[bt]
                    ll += float(module.log_likelihood(u, s, d).sum())
                    sq += float(((u - d.u) ** 2 + (s - d.s) ** 2).sum())
            n = max(len(test_idx), 1)
            return ll / n, sq / (n * n_genes)

        self._update_sigma(module, tensors, decode_all(), train_idx)
        start_score, start_mse = held_out()
        best = (start_score, start_mse, copy.deepcopy(module.state_dict()))
        lr = self.learning_rate * _POLISH_LR_FACTOR
        groups = [{"params": module.ode_parameters(), "lr": lr * ODE_LR_FACTOR}]
        if features is not None:
            groups.append({"params": list(module.rho_head.parameters()), "lr": lr})
        opt = _adam(groups)
        n_epochs = self.max_epochs_polish
        # the learning rates annealed to 0 over the epochs (cosine): at a constant rate the
        # minibatches' noise kept the held-out MSE jumping (on the pancreas 0.84-1.05 from
        # epoch 25 to 38, where the stages' rule stopped it)
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.5 * (1 + math.cos(math.pi * e / n_epochs)))
        history["polish"] = []
        history["polish_mse_test"] = []

        def loss_of(bt: torch.Tensor) -> torch.Tensor:
            return -module.log_likelihood_at(tensors.u[bt], tensors.s[bt], t[bt], rho_of(bt)).mean()

        for epoch in range(n_epochs):
            # no batch normalisation is trained here: a one-cell batch is kept
            self._minibatch_epoch(run, loss_of, [opt], min_batch=1)
            schedule.step()
            if self._sigma_every and (epoch + 1) % self._sigma_every == 0:
                self._update_sigma(module, tensors, decode_all(), train_idx)
            score, mse = held_out()
            history["polish"].append(score)
            history["polish_mse_test"].append(mse)
            if score > best[0] and mse <= start_mse:
                best = (score, mse, copy.deepcopy(module.state_dict()))
            run.advance(f"polish epoch {epoch + 1}: held-out MSE {mse:.3g}")
        history["polish_vs_start"] = [start_score, best[0]]
        history["polish_vs_start_mse"] = [start_mse, best[1]]
        module.load_state_dict(best[2])

    def _update_sigma(self, module: VAEModule, tensors: _Tensors, dec: Any, train_idx: np.ndarray) -> None:
        """Per-gene noise: the root mean squared residual over the training cells (its MLE)."""
        import torch

        idx = torch.from_numpy(train_idx).to(tensors.u.device)
        with torch.no_grad():
            su = (tensors.u[idx] - dec.u[idx]).pow(2).mean(0).sqrt()
            ss = (tensors.s[idx] - dec.s[idx]).pow(2).mean(0).sqrt()
            floor_u = _SIGMA_FLOOR * tensors.u.std(0) + 1e-6
            floor_s = _SIGMA_FLOOR * tensors.s.std(0) + 1e-6
            module.sigma_u.copy_(torch.maximum(su, floor_u))
            module.sigma_s.copy_(torch.maximum(ss, floor_s))

    # ------------------------------------------------------------------------------ results

    def _extract(
        self,
        module: VAEModule,
        tensors: _Tensors,
        post: dict[str, torch.Tensor],
        x0: InitialState | None,
        generator: torch.Generator,
    ) -> dict[str, np.ndarray]:
        """Predictions, velocities, the time SD and the sampled velocity uncertainty."""
        import torch

        t, c = post["t_mean"], post.get("c_mean")
        dec = self._decode_all(module, t, c, x0)
        with torch.inference_mode():
            # time SD: the tempered grid posterior's (see _refine_time)
            t_sd = post["t_sd"][:, 0]

            # velocity uncertainty: 1 - mean cosine between sampled and mean velocity; and
            # each gene's sample variance of the velocity (shifted by the mean velocity,
            # which the samples scatter around, so E[d^2] - E[d]^2 does not cancel)
            # each draw decoded a chunk of cells at a time into the sums (a whole draw, its
            # difference from the mean and their products were 320 MB at 100,000 cells)
            n = t.shape[0]
            cos_sum = torch.zeros(n, device=t.device)
            vmean = dec.velocity
            d_sum = torch.zeros_like(vmean)
            d_sq = torch.zeros_like(vmean)
            for tt, cc in self._posterior_draws(post):
                for start in range(0, n, _CHUNK):
                    sl = slice(start, start + _CHUNK)
                    velocity = module.decode(tt[sl], None if cc is None else cc[sl], _take(x0, sl)).velocity
                    cos_sum[sl] += _cosine(velocity, vmean[sl])
                    d = velocity.sub_(vmean[sl])
                    d_sum[sl] += d
                    d_sq[sl] += d.mul_(d)
            unc = (1 - cos_sum / self.n_samples).clamp(min=0)
            k = self.n_samples
            # (d_sq - d_sum^2 / k) / (k - 1), in place
            v_var = d_sq.sub_(d_sum.mul_(d_sum).div_(k)).div_(k - 1).clamp_(min=0)
            del d_sum

        def np_(x: torch.Tensor) -> np.ndarray:
            return x.float().cpu().numpy()

        alpha, beta, gamma, scaling = module.rates()
        out = {
            "t_mean": np_(t[:, 0]),
            "t_sd": np_(t_sd),
            "t_mean_encoder": np_(post["t_mean_encoder"][:, 0]),
            "t_sd_encoder": np_(post["t_sd_encoder"][:, 0]),
            "u": np_(dec.u),
            "s": np_(dec.s),
            "rho": np_(dec.rho),
            "velocity": np_(dec.velocity),
            "velocity_u": np_(dec.velocity_u),
            "uncertainty": np_(unc),
            "velocity_variance": np_(v_var),
            "alpha": np_(alpha.detach()),
            "beta": np_(beta.detach()),
            "gamma": np_(gamma.detach()),
            "scaling": np_(scaling.detach()),
            "t_on": np_(module.t_on.detach()),
            "t_off": np_(module.switch_times()),
            "sigma_u": np_(module.sigma_u),
            "sigma_s": np_(module.sigma_s),
        }
        if c is not None:
            out["c_mean"] = np_(c)
            out["c_sd"] = np_(post["c_sd"])
        return out

    def _velocity_samples(
        self, module: VAEModule, post: dict[str, torch.Tensor], x0: InitialState | None
    ) -> Iterator[torch.Tensor]:
        """``n_samples`` spliced velocities ``(n_obs, n_genes)``, each at a posterior draw of every cell's ``(t, c)``.

        ``t`` from the tempered grid posterior (mean, SD), ``c`` from the encoder's
        Gaussian; seeded by ``seed + 1``, so the same fit gives the same draws.
        """
        for tt, cc in self._posterior_draws(post):
            yield self._decode_all(module, tt, cc, x0, fields=("velocity",)).velocity

    def _posterior_draws(
        self, post: dict[str, torch.Tensor]
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """``n_samples`` draws of every cell's ``(t, c)`` (``c`` None: basic model), seeded ``seed + 1``."""
        import torch

        t, c, t_sd = post["t_mean"], post.get("c_mean"), post["t_sd"]
        g = torch.Generator(device="cpu").manual_seed(self.seed + 1)
        for _ in range(self.n_samples):
            tt = t + t_sd * torch.randn(t.shape, generator=g).to(t.device)
            cc = None
            if c is not None:
                cc = c + post["c_sd"] * torch.randn(c.shape, generator=g).to(t.device)
            yield tt, cc

    def sample_velocity(self) -> np.ndarray:
        """The posterior samples behind the velocity uncertainty and ``layers['velocity_variance']``.

        Returns
        -------
        ``(n_samples, n_obs, n_genes)`` float32 spliced velocities of the fitted genes
        (those with a finite ``var['fit_alpha']``), the same draws :meth:`fit` made.
        """
        if not hasattr(self, "posterior_state_"):
            msg = "This VeloVAE is not fitted yet: call fit(adata) first."
            raise InputError(msg)
        post, x0 = self.posterior_state_
        return np.stack([v.float().cpu().numpy() for v in self._velocity_samples(self.module_, post, x0)])

    def _result(
        self,
        adata: AnnData,
        cols: np.ndarray,
        out: dict[str, np.ndarray],
        train: np.ndarray,
        module: VAEModule,
        moments: tuple[np.ndarray, np.ndarray],
    ) -> tuple[VelocityResult, dict[str, float]]:
        """The fit's :class:`VelocityResult` and its reconstruction error's summary (``metrics_``).

        ``moments``: ``(Mu, Ms)`` of the fitted genes, as the fit read them.
        """
        n_obs, n_vars = adata.n_obs, adata.n_vars
        var_names, obs_names = adata.var_names.copy(), adata.obs_names.copy()

        every_gene = len(cols) == n_vars  # cols are sorted and distinct (np.flatnonzero)

        def full_cells(x: np.ndarray) -> np.ndarray:
            if every_gene and x.dtype == np.float32:
                return x  # the read-out's own array: no second copy of it
            arr = np.full((n_obs, n_vars), np.nan, dtype=np.float32)
            arr[:, cols] = x
            return arr

        def full_genes(x: np.ndarray) -> np.ndarray:
            arr = np.full(n_vars, np.nan, dtype=np.float32)
            arr[cols] = x
            return arr

        Mu, Ms = moments
        err = reconstruction_error(Mu, Ms, out["u"], out["s"], train=train)
        # R² of the predictions, u and s in units of their spread (as the dynamical model's),
        # a block of genes at a time (whole, its temporaries were 0.4 GB at 100,000 cells)
        sse = np.empty(len(cols), dtype=np.float32)
        for block in gene_blocks(n_obs, len(cols)):
            mu, ms = Mu[:, block], Ms[:, block]
            su, ss = mu.std(0).clip(min=1e-12), ms.std(0).clip(min=1e-12)
            du, ds = (mu - out["u"][:, block]) / su, (ms - out["s"][:, block]) / ss
            sse[block] = (du**2 + ds**2).sum(0)
        r2 = 1 - sse / (2 * n_obs)
        columns = {
            Key.var.FIT_ALPHA: out["alpha"],
            # scVelo's convention: fit_beta * fit_scaling is the ODE's splicing rate
            Key.var.FIT_BETA: out["beta"] / out["scaling"],
            Key.var.FIT_GAMMA: out["gamma"],
            Key.var.FIT_SCALING: out["scaling"],
            Key.var.FIT_T_ON: out["t_on"],
            Key.var.FIT_T_: out["t_off"],
            Key.var.FIT_SIGMA_U: out["sigma_u"],
            Key.var.FIT_SIGMA_S: out["sigma_s"],
            Key.var.FIT_R2: r2,
            # scVelo's likelihood (u, s in units of their spread) on the training cells: a
            # density in counts (exp of the mean log-density, before 2026-12-05) ranked first
            # the genes with the least unspliced RNA, whatever their fit
            Key.var.FIT_LIKELIHOOD: gene_likelihood(Mu, Ms, out["u"], out["s"], cells=train),
            Key.var.FIT_MSE_TRAIN: err.per_gene["mse_train"].to_numpy(),
            Key.var.FIT_MSE_TEST: err.per_gene["mse_test"].to_numpy(),
            # Bergen et al. 2021, Box 1, as the dynamical model's (s_inf * u_inf, the ODE's own
            # splicing rate). Not its kinetic signal beta / (beta + gamma): VeloVAE's beta and
            # gamma do not recover it (Spearman 0.18 / 0.33 with the truth on scVelo's
            # simulator, seeds 1 and 2, 34-43 of 100 genes put below 0.5 where none is)
            Key.var.FIT_DETECTION_POWER: kinetics.detection_power(
                out["alpha"], out["beta"], out["gamma"], out["scaling"]
            ),
        }
        gene_params = pd.DataFrame({k: full_genes(np.asarray(v)) for k, v in columns.items()}, index=var_names)
        genes_ok = np.zeros(n_vars, dtype=bool)
        genes_ok[cols] = np.isfinite(r2) & (r2 > 0.01) & np.isfinite(out["velocity"]).all(0)
        if not genes_ok.any():
            genes_ok[cols] = np.isfinite(out["velocity"]).all(0)
        t = out["t_mean"]
        lo, hi = float(t.min()), float(t.max())
        span = hi - lo if hi > lo else 1.0
        latent = ((t - lo) / span).astype(np.float32)
        obs = pd.DataFrame(
            {
                Key.obs.LATENT_TIME_STD: (out["t_sd"] / span).astype(np.float32),
                # on the model's own clock, which starts at the earliest onset (t >= 0 mostly)
                Key.obs.LATENT_TIME_CV: _time_cv(out["t_sd"], t, self.t_max),
                Key.obs.FIT_TRAIN: train,
                Key.obs.LATENT_TIME_MODEL: t.astype(np.float32),
            },
            index=obs_names,
        )
        if self._start_spread is not None:
            obs[Key.obs.LATENT_TIME_START_SPREAD] = self._start_spread.astype(np.float32)
        width = rank_width(t, out["t_sd"], self._start_spread)
        obs[Key.obs.LATENT_TIME_RANK_WIDTH] = width.astype(np.float32)
        obsm = {}
        if "c_mean" in out:
            obsm = {Key.obsm.CELL_STATE: out["c_mean"], Key.obsm.CELL_STATE_STD: out["c_sd"]}
        # each read-out array goes as its layer comes (``out`` is not read after this)
        layers = {
            Key.layers.PREDICTED_U: full_cells(out.pop("u")),
            Key.layers.PREDICTED_S: full_cells(out.pop("s")),
        }
        rho = out.pop("rho")
        if self.variant == "full":
            layers[Key.layers.RHO] = full_cells(rho)
        del rho
        layers[Key.layers.VELOCITY_VARIANCE] = full_cells(out.pop("velocity_variance"))
        result = VelocityResult(
            model=self.name,
            params=self.get_params(),
            obs_names=obs_names,
            var_names=var_names,
            velocity=full_cells(out.pop("velocity")),
            gene_params=gene_params,
            velocity_genes=genes_ok,
            likelihood=pd.Series(gene_params[Key.var.FIT_LIKELIHOOD], index=var_names, name=Key.var.FIT_LIKELIHOOD),
            velocity_u=full_cells(out.pop("velocity_u")),
            latent_time=latent,
            uncertainty=out["uncertainty"].astype(np.float32),
            layers=layers,
            obs=obs,
            obsm=obsm or None,
        )
        return result, err.summary


def lineage_curves(adata: AnnData, gene: str, groupby: str, *, n_points: int = 200) -> pd.DataFrame:
    """Each group's predicted ``(u, s)`` curve of ``gene`` from a VeloVAE fit written to ``adata``.

    A group's curve is the first-stage ODE (off until ``fit_t_on``, induced until
    ``fit_t_``, then repressed; ``fit_t_ = inf`` for a gene without a switch-off) with the
    transcription rate ``fit_alpha`` scaled by the group's mean ``rho`` for the gene (1 for
    the basic model), over the group's range of ``obs['latent_time_model']`` (``n_points``
    times). Stage 2 starts each cell from earlier cells, so its predictions
    (``layers['predicted_u' / 'predicted_s']``) can differ from these curves.

    Returns
    -------
    A data frame with columns ``group``, ``t`` (the model's clock), ``u`` (count units
    of ``Mu``) and ``s``, ``n_points`` rows per group with cells.
    """
    needed = [Key.var.FIT_ALPHA, Key.var.FIT_BETA, Key.var.FIT_GAMMA, Key.var.FIT_SCALING, Key.var.FIT_T_ON]
    missing = [k for k in [*needed, Key.var.FIT_T_] if k not in adata.var]
    if Key.obs.LATENT_TIME_MODEL not in adata.obs:
        missing.append(f"obs[{Key.obs.LATENT_TIME_MODEL!r}]")
    if missing:
        msg = (
            f"lineage_curves needs a velovae fit written to the AnnData; missing {missing}. "
            "Run VeloVAE().fit(adata).to_adata(adata)."
        )
        raise InputError(msg)
    if gene not in adata.var_names:
        msg = f"gene {gene!r} is not in var_names; pass one of the fitted genes."
        raise InputError(msg)
    if groupby not in adata.obs:
        msg = f"groupby={groupby!r} is not an obs column; adata.obs has {list(adata.obs.columns)}."
        raise InputError(msg)
    j = adata.var_names.get_loc(gene)
    row = adata.var.iloc[j]
    alpha, beta, gamma, scaling = (float(row[k]) for k in needed[:4])
    t_on, t_off = float(row[Key.var.FIT_T_ON]), float(row[Key.var.FIT_T_])
    # fit_t_ is +inf where the gene never switches off (the full model)
    if not np.isfinite([alpha, beta, gamma, scaling, t_on]).all() or np.isnan(t_off) or t_off == -np.inf:
        msg = f"gene {gene!r} was not fitted by velovae (its rates are NaN); pick a fitted gene."
        raise InputError(msg)
    rho = None
    if Key.layers.RHO in adata.layers:
        rho = np.asarray(adata.layers[Key.layers.RHO][:, j], dtype=np.float64).ravel()
    t_cells = adata.obs[Key.obs.LATENT_TIME_MODEL].to_numpy(dtype=np.float64)
    labels = adata.obs[groupby].astype(str).to_numpy()
    frames = []
    for group in pd.unique(labels):
        cells = labels == group
        r = 1.0 if rho is None else float(np.nanmean(rho[cells]))
        t = np.linspace(t_cells[cells].min(), t_cells[cells].max(), n_points)
        # no switch-off: one after the group's last time (and the onset) is the same curve
        t_sw = t_off if np.isfinite(t_off) else max(float(t[-1]), t_on) + 1.0
        u, s = kinetics.trajectory(t, t_sw, r * alpha, beta * scaling, gamma, t_on=t_on)
        u, s = np.clip(u, 0, None) * scaling, np.clip(s, 0, None)
        frames.append(pd.DataFrame({"group": group, "t": t, "u": u, "s": s}))
    return pd.concat(frames, ignore_index=True)


def start_shift(t: ArrayLike, t_other: ArrayLike) -> np.ndarray:
    """``(n_obs,)`` where another fit places each cell, on this fit's clock, minus where this fit does.

    Each fit's clock is its own (a monotone map of the true one at best), so the other
    fit's time is read as its mid-rank quantile among the cells, ``(rank - 1/2) / n``, and
    mapped onto this clock through this fit's own times at that quantile. No true time is
    used.

    Examples
    --------
    >>> start_shift([0.0, 1.0, 2.0, 3.0], [0.0, 20.0, 10.0, 30.0]).tolist()
    [0.0, 1.0, -1.0, 0.0]
    """
    from scipy.stats import rankdata

    t = np.asarray(t, dtype=np.float64).ravel()
    other = np.asarray(t_other, dtype=np.float64).ravel()
    if t.shape != other.shape or not (np.isfinite(t).all() and np.isfinite(other).all()):
        msg = f"start_shift needs two finite times of the same cells; got shapes {t.shape} and {other.shape}."
        raise InputError(msg)
    n = len(t)
    q = (np.arange(n) + 0.5) / n
    return np.interp((rankdata(other) - 0.5) / n, q, np.sort(t)) - t


def start_spread(t_a: ArrayLike, t_b: ArrayLike) -> np.ndarray:
    """``(n_obs,)`` each cell's distance between its ranks under two initial times, as a share of the cells.

    VeloVAE's fitted time keeps the order of the time it starts from where the data do not
    decide it (between lineages: README, "VeloVAE"), so a cell whose rank differs between
    the steady-state fit's latent time and diffusion pseudotime has a time the start, not
    the data, sets. Ties share their mean rank.

    Examples
    --------
    >>> start_spread([0.0, 0.5, 1.0, 0.2], [0.0, 1.0, 0.5, 0.2]).tolist()
    [0.0, 0.25, 0.25, 0.0]
    """
    from scipy.stats import rankdata

    a, b = np.asarray(t_a, dtype=np.float64), np.asarray(t_b, dtype=np.float64)
    return np.abs(rankdata(a) - rankdata(b)) / len(a)


def tied_at_start(t: ArrayLike) -> np.ndarray:
    """``(n_obs,)`` bool: the cells :func:`untie_start` spreads.

    Those within ``1e-6`` of ``t``'s range of its minimum, where at least two are and ``t``
    is not constant; else none.
    """
    t = np.asarray(t, dtype=np.float64)
    lo, hi = t.min(), t.max()
    tied = t <= lo + 1e-6 * (hi - lo)
    if hi <= lo or tied.sum() < 2:
        tied[:] = False
    return tied


def untie_start(t: ArrayLike, order: ArrayLike) -> np.ndarray:
    """``t`` with the cells tied at its start spread, in ``order``, over their share of its range.

    The steady-state fit's latent time combines percentiles of each cell's gene times; where
    most genes of the earliest cells have not switched on, those percentiles are all 0 and a
    block of cells shares the time 0 (3-33 % of the cells on the project's two-lineage
    simulations, under 1.5 % on scVelo's). The cells within ``1e-6`` of the range of the
    minimum take evenly spaced times from the minimum up to their share ``f`` of the range,
    in the order of ``order`` (ties share their mean rank); the others are moved linearly onto
    the rest of the range, so the order of every cell not tied is kept. Fewer than two tied
    cells: ``t`` unchanged. Measured 2026-12-05: the cells' mean ranked, smoothed gene time
    orders the tied cells against the true time at Spearman 0.71-0.99 on nine simulations,
    the residue the tie leaves in ``t`` at -0.31 to 0.90.

    Examples
    --------
    >>> untie_start([0.0, 0.0, 0.0, 0.5, 1.0], [3.0, 1.0, 2.0, 0.0, 0.0]).round(3).tolist()
    [0.4, 0.0, 0.2, 0.6, 1.0]
    """
    from scipy.stats import rankdata

    t = np.asarray(t, dtype=np.float64)
    tied = tied_at_start(t)
    n_tied = int(tied.sum())
    if n_tied == 0:
        return t
    lo, hi = t.min(), t.max()
    share = n_tied / len(t)
    out = np.empty_like(t)
    span = hi - lo
    out[tied] = lo + share * span * (rankdata(np.asarray(order, dtype=np.float64)[tied]) - 1) / n_tied
    rest = t[~tied]
    if len(rest):
        first = rest.min()
        scaled = (rest - first) / (hi - first) if hi > first else np.ones_like(rest)
        out[~tied] = lo + span * (share + (1 - share) * scaled)
    return out


def diffusion_pseudotime(adata: AnnData, root: int, *, n_comps: int = _DPT_COMPONENTS) -> np.ndarray:
    """``(n_obs,)`` scanpy's diffusion pseudotime (Haghverdi et al. 2016) from cell ``root``, in [0, 1].

    ``sc.tl.diffmap`` and ``sc.tl.dpt`` on the kNN graph in ``adata.obsp`` (on a
    stripped copy; ``adata`` is unchanged). Files that keep only the connectivities
    (scVelo's compact simulations) use their pattern as the distances: scanpy's
    diffusion map reads its transitions from the connectivities. Cells the root cannot
    reach get the latest time.
    """
    import anndata
    import scanpy as sc

    keys = {"connectivities_key": "connectivities", "distances_key": "distances"}
    conn = sparse.csr_matrix(adata.obsp[Key.obsp.CONNECTIVITIES])
    dist = adata.obsp[Key.obsp.DISTANCES] if Key.obsp.DISTANCES in adata.obsp else conn.copy()
    n_neighbors = int(np.median(np.diff(sparse.csr_matrix(dist).indptr))) + 1
    params = dict(adata.uns.get(Key.uns.NEIGHBORS, {}).get("params", {}))
    params.setdefault("method", "umap")
    params.setdefault("n_neighbors", n_neighbors)
    a = anndata.AnnData(
        obs=pd.DataFrame(index=adata.obs_names.copy()),
        obsp={"connectivities": conn, "distances": sparse.csr_matrix(dist)},
        uns={"neighbors": {**keys, "params": params}},
    )
    # no more components than a handful of cells have (5 cells: scanpy raised "Cannot
    # instantiate using n_dcs=10"); scanpy's own 10 for DPT wherever there are that many
    n_comps = max(2, min(n_comps, adata.n_obs - 2))
    sc.tl.diffmap(a, n_comps=n_comps)
    a.uns["iroot"] = int(root)
    sc.tl.dpt(a, n_dcs=min(_DPT_DCS, n_comps))
    t = a.obs["dpt_pseudotime"].to_numpy(dtype=np.float64)
    finite = np.isfinite(t)
    t[~finite] = t[finite].max() if finite.any() else 0.0
    return np.asarray(lt_mod.scale01(t), dtype=np.float64)


def _time_cv(sd: np.ndarray, t: np.ndarray, length: float) -> np.ndarray:
    """Float32 coefficient of variation of times ``t`` on a clock of ``length``: ``sd / |t|``.

    ``|t|`` is floored at a thousandth of the clock, so cells at its start get a finite CV.
    """
    return (sd / np.maximum(np.abs(t), 1e-3 * length)).astype(np.float32)


def ensemble_time(t_mean: np.ndarray, t_sd: np.ndarray) -> dict[str, np.ndarray]:
    """Pool ``K`` fits' time posteriors of the same cells on one scale: each fit's rank.

    Each fit's clock is its own (a monotone map of the true one at best), so fit ``k``'s
    time is read as its mid-rank quantile ``F_k(t) = (rank - 1/2) / n`` among the cells and
    its SD through the same empirical CDF, ``(F_k(t + sd) - F_k(t - sd)) / 2`` (a cell
    where the clock runs fast gets a wider SD on the common scale, one where it stalls a
    narrower one). The pooled posterior is the equal-weight mixture of the fits':
    ``mean = mean_k m_k``, ``sd^2 = mean_k s_k^2 + mean_k (m_k - mean)^2`` (law of total
    variance). No true time is used.

    Parameters
    ----------
    t_mean, t_sd
        ``(K, n_obs)`` posterior means and SDs, each row on its fit's own clock.

    Returns
    -------
    ``mean``, ``sd``, ``sd_within`` (root mean within-fit variance) and ``sd_between``
    (root between-fit variance), each ``(n_obs,)`` on the quantile scale ``[0, 1]``.
    """
    from scipy.stats import rankdata

    t_mean = np.atleast_2d(np.asarray(t_mean, dtype=np.float64))
    t_sd = np.atleast_2d(np.asarray(t_sd, dtype=np.float64))
    if t_mean.shape != t_sd.shape:
        msg = (
            f"ensemble_time needs (K, n_obs) means and SDs of one shape; got {t_mean.shape} and "
            f"{t_sd.shape}."
        )
        raise InputError(msg)
    bad = int((~np.isfinite(t_mean)).sum() + (~(np.isfinite(t_sd) & (t_sd >= 0))).sum())
    if bad:
        msg = f"ensemble_time needs finite means and finite non-negative SDs; {bad} values are not."
        raise InputError(msg)
    n = t_mean.shape[1]
    q = (np.arange(n) + 0.5) / n
    means, sds = np.empty_like(t_mean), np.empty_like(t_sd)
    for k, (t, sd) in enumerate(zip(t_mean, t_sd, strict=True)):
        means[k] = (rankdata(t) - 0.5) / n
        xs = np.sort(t)
        sds[k] = (np.interp(t + sd, xs, q) - np.interp(t - sd, xs, q)) / 2
    mean = means.mean(0)
    within, between = (sds**2).mean(0), ((means - mean) ** 2).mean(0)
    sd = np.sqrt(within + between)
    return {"mean": mean, "sd": sd, "sd_within": np.sqrt(within), "sd_between": np.sqrt(between)}


def _participation_temperature(r: Any) -> tuple[float, float]:
    """``(n_eff, temperature)`` of centred, standardised residuals ``r`` ``(n, features)``.

    ``n_eff`` is the participation ratio ``(sum lambda)^2 / sum lambda^2`` of the
    residuals' covariance eigenvalues: the number of independent directions they have.
    The temperature is ``features / n_eff`` (at least 1). With ``lambda`` the squared
    singular values of ``r``, ``sum lambda = ||r||_F^2`` and ``sum lambda^2 = ||r^T r||_F^2
    = ||r r^T||_F^2``, so one product of the smaller side serves, not an SVD (with ``rho``
    decoded once per chunk, the time grid fell from 23 to 18 CPU-s on the pancreas, same
    result). Takes a numpy array or a torch tensor (double precision).
    """
    gram = r @ r.T if r.shape[0] <= r.shape[1] else r.T @ r
    n_eff = float((r * r).sum()) ** 2 / max(float((gram * gram).sum()), 1e-300)
    return n_eff, max(r.shape[1] / max(n_eff, 1.0), 1.0)


def _grid_moments(
    loglik: torch.Tensor, log_prior: torch.Tensor, grid: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(n,)`` mean and SD of the posterior ``softmax(loglik / temperature + log_prior)`` over ``grid``."""
    import torch

    with torch.inference_mode():
        w = torch.softmax(loglik / temperature + log_prior, 1)
        mean = (w * grid).sum(1)
        sd = (w * (grid - mean[:, None]) ** 2).sum(1).sqrt()
    return mean, sd


def time_calibration(
    true_t: np.ndarray, t: np.ndarray, sd: np.ndarray, *, level: float = 0.9, seed: int = 0
) -> dict[str, float]:
    """How well a time posterior's intervals match a known time (a simulator's).

    A model's clock equals the true one only up to a monotone map, so each cell's time
    and interval ``t ± z sd`` (``z`` of the two-sided ``level``) are mapped to the true
    axis by the monotone (isotonic, least-squares) regression of ``true_t`` on ``t``,
    cross-fitted: fitted on a seeded half of the cells and applied to the other half,
    and the reverse, so that no cell's own true time places its interval. Figures
    through a cubic map fitted on all cells (the measure used before; a cubic cannot
    follow a clock that stalls or speeds up, and counts that as per-cell error) are
    given beside them.

    Parameters
    ----------
    true_t, t, sd
        ``(n_obs,)`` true time, posterior mean and posterior SD (model clock).
    level
        Nominal coverage of the intervals.
    seed
        Seed of the split into halves.

    Returns
    -------
    ``coverage`` (share of true times inside the mapped intervals), ``width_error_spearman``
    (rank correlation of each mapped interval's width with the cell's absolute error, both
    on the true axis), ``sd_error_spearman`` (of the SD itself with that error),
    ``median_error``, and ``coverage_cubic``, ``sd_error_spearman_cubic``;
    ``share_error_spearman``: of each interval's width in cells (:func:`interval_share`)
    with the cell's rank error (the distance between its ranks by ``t`` and by ``true_t``,
    as a share of the cells), where no map is needed: both are the same on any clock.
    """
    from scipy.stats import rankdata

    true_t, t, sd = (np.asarray(x, dtype=np.float64).ravel() for x in (true_t, t, sd))
    z = NormalDist().inv_cdf(0.5 + level / 2)
    n = len(t)
    half = np.random.default_rng(seed).permutation(n) < n // 2
    err, width, inside = np.empty(n), np.empty(n), np.empty(n, dtype=bool)
    for part in (half, ~half):
        xs, ys = _isotonic(t[~part], true_t[~part])
        lo, hi = np.interp(t[part] - z * sd[part], xs, ys), np.interp(t[part] + z * sd[part], xs, ys)
        err[part] = np.abs(np.interp(t[part], xs, ys) - true_t[part])
        width[part] = hi - lo
        inside[part] = (true_t[part] >= lo) & (true_t[part] <= hi)
    cubic = np.poly1d(np.polyfit(t, true_t, 3))
    err_c = np.abs(cubic(t) - true_t)
    lo_c, hi_c = cubic(t - z * sd), cubic(t + z * sd)
    inside_c = (true_t >= np.minimum(lo_c, hi_c)) & (true_t <= np.maximum(lo_c, hi_c))

    def rank_corr(a: np.ndarray, b: np.ndarray) -> float:
        return float(pd.Series(a).corr(pd.Series(b), method="spearman"))

    rank_err = np.abs(rankdata(t) - rankdata(true_t)) / n
    return {
        "coverage": float(inside.mean()),
        "width_error_spearman": rank_corr(width, err),
        "sd_error_spearman": rank_corr(sd, err),
        "share_error_spearman": rank_corr(interval_share(t, sd, level=level), rank_err),
        "median_error": float(np.median(err)),
        "coverage_cubic": float(inside_c.mean()),
        "sd_error_spearman_cubic": rank_corr(sd, err_c),
    }


def interval_share(t: ArrayLike, sd: ArrayLike, *, level: float = 0.9) -> np.ndarray:
    """``(n_obs,)`` the share of all cells whose time lies inside each cell's interval ``t ± z sd``.

    The interval's width counted in cells, as a share of them: how much of the ordering a
    cell's place is uncertain over. It reads only the fit (no true time) and does not
    depend on the clock: any increasing map of ``t`` with the interval's ends gives the
    same shares. ``z`` is the two-sided ``level``'s.

    Examples
    --------
    >>> interval_share(np.arange(10.0), np.array([0.0] * 9 + [2.0]), level=0.9).round(1).tolist()
    [0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.4]
    """
    t, sd = np.asarray(t, dtype=np.float64).ravel(), np.asarray(sd, dtype=np.float64).ravel()
    z = NormalDist().inv_cdf(0.5 + level / 2)
    ordered = np.sort(t)
    inside = np.searchsorted(ordered, t + z * sd, side="right") - np.searchsorted(ordered, t - z * sd)
    return inside / len(t)


def rank_width(
    t: ArrayLike, sd: ArrayLike, spread: ArrayLike | None = None, *, level: float = 0.9
) -> np.ndarray:
    """``(n_obs,)`` the width of each cell's interval of place in the ordering, as a share of the cells.

    The posterior's interval counted in cells (:func:`interval_share`), widened by the
    starts' disagreement ``spread`` (:func:`start_spread`, a share of the cells) as a
    mixture of two equally likely places that far apart: in rank units the mixture's SD is
    ``sqrt(sd_rank^2 + (spread / 2)^2)``, so its ``level`` interval is
    ``sqrt(share^2 + (z spread)^2)`` wide (``z`` the two-sided ``level``'s). Without
    ``spread`` (capture times, DPT refused, two starts already pooled) it is the share.
    It reads only the fit, and no clock: the time SD itself is on the model's clock, which
    runs unevenly against the true one (README, "VeloVAE": "The time's uncertainty in cells").

    Examples
    --------
    >>> rank_width(np.arange(10.0), np.zeros(10), np.array([0.0] * 9 + [0.5])).round(2).tolist()
    [0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.83]
    """
    share = interval_share(t, sd, level=level)
    if spread is None:
        return share
    z = NormalDist().inv_cdf(0.5 + level / 2)
    return np.sqrt(share**2 + (z * np.asarray(spread, dtype=np.float64).ravel()) ** 2)


def oracle_time_posterior(adata: AnnData, *, n_grid: int = 200, chunk: int = 256) -> dict[str, Any]:
    """The time posterior a perfect model would give: the simulator's own noise-free curves.

    The reference for :func:`time_calibration` on data from
    :func:`explorer.data.simulate.simulate`: what any per-cell time posterior can reach
    there, known kinetics and lineage included. Each lineage's curve is the noise-free
    abundance (``layers['true_u']``, ``['true_s']``) of its cells and the root's, in
    order of ``obs['true_t']``, scaled per gene (least squares through the origin) to the
    smoothed ``Mu`` / ``Ms`` the models fit. A cell's likelihood at each of ``n_grid``
    times is Gaussian with per-gene noise (the residuals' SD at the true times) on its
    own lineage's curve (a root cell, whose lineage is not yet decided: the mean of the
    lineages' likelihoods), tempered as :meth:`VeloVAE._refine_time` tempers its own
    (``2 G / n_eff``, the participation ratio of the residuals), with a flat prior.

    Also on scVelo's simulator (``scvelo.datasets.simulation``, one lineage): without the
    ``true_u`` / ``true_s`` layers, the curves are its on/off model's
    (:func:`explorer.kinetics.trajectory`) from ``var['true_alpha']``, ``['true_beta']``,
    ``['true_gamma']`` and the switch times ``['true_t_']``, at each cell's ``true_t``.

    Returns ``t_mean`` and ``t_sd`` (``(n_obs,)``, on the true clock), ``temperature`` and
    ``n_eff``.
    """
    rates = ("true_t_", "true_alpha", "true_beta", "true_gamma")
    curves = ("true_u", "true_s") if all(k in adata.layers for k in ("true_u", "true_s")) else rates
    needed = [*(k for k in (Key.layers.MU, Key.layers.MS) if k not in adata.layers)]
    needed += [k for k in ("true_t",) if k not in adata.obs]
    needed += [k for k in curves if k not in (adata.layers if curves[0] == "true_u" else adata.var)]
    if needed:
        msg = (
            "The oracle time posterior needs a simulation with its moments: from "
            "explorer.data.simulate (layers true_u, true_s) or scVelo's datasets.simulation (var "
            f"{', '.join(rates)}), obs true_t and layers Mu, Ms; missing {needed}. Simulate, then run "
            "explorer.pipeline.prepare."
        )
        raise InputError(msg)

    def dense(key: str) -> np.ndarray:
        x = adata.layers[key]
        return np.asarray(x.toarray() if sparse.issparse(x) else x, dtype=np.float64)

    mu, ms = dense(Key.layers.MU), dense(Key.layers.MS)
    true_t = adata.obs["true_t"].to_numpy(dtype=np.float64)
    if curves[0] == "true_u":
        true_u, true_s = dense("true_u"), dense("true_s")
    else:  # scVelo's simulator: its rates and switch times
        t_, alpha, beta, gamma = (adata.var[k].to_numpy(dtype=np.float64)[None] for k in rates)
        true_u, true_s = kinetics.trajectory(true_t[:, None], t_, alpha, beta, gamma)
    if "true_lineage" in adata.obs:
        lineage = adata.obs["true_lineage"].astype(str).to_numpy()
    else:
        lineage = np.full(adata.n_obs, "root")
    # the noise-free abundances on the scale of the smoothed data
    true_u = true_u * ((mu * true_u).sum(0) / np.maximum((true_u * true_u).sum(0), 1e-12))
    true_s = true_s * ((ms * true_s).sum(0) / np.maximum((true_s * true_s).sum(0), 1e-12))
    sd_u = (mu - true_u).std(0).clip(min=1e-6)
    sd_s = (ms - true_s).std(0).clip(min=1e-6)
    r = np.concatenate([(mu - true_u) / sd_u, (ms - true_s) / sd_s], axis=1)
    r -= r.mean(0)
    n_eff, temperature = _participation_temperature(r)

    grid = np.linspace(true_t.min(), true_t.max(), n_grid)
    branches = [name for name in np.unique(lineage) if name != "root"] or ["root"]
    loglik = np.empty((len(branches), adata.n_obs, n_grid))
    for b, name in enumerate(branches):
        on = (lineage == name) | (lineage == "root")
        order = np.argsort(true_t[on], kind="stable")
        t_on = true_t[on][order]
        cu = np.stack([np.interp(grid, t_on, col) for col in true_u[on][order].T], axis=1) / sd_u
        cs = np.stack([np.interp(grid, t_on, col) for col in true_s[on][order].T], axis=1) / sd_s
        for start in range(0, adata.n_obs, chunk):
            sl = slice(start, start + chunk)
            du = (mu[sl] / sd_u)[:, None, :] - cu[None]
            ds = (ms[sl] / sd_s)[:, None, :] - cs[None]
            loglik[b, sl] = -0.5 * ((du * du).sum(2) + (ds * ds).sum(2))
    own = np.array([branches.index(name) if name in branches else -1 for name in lineage])
    cell_ll = np.empty((adata.n_obs, n_grid))
    known = own >= 0
    cell_ll[known] = loglik[own[known], np.flatnonzero(known)]
    if (~known).any():  # the root's cells: either lineage's future
        z = loglik[:, ~known] / temperature
        peak = z.max(0)
        cell_ll[~known] = (peak + np.log(np.exp(z - peak).mean(0))) * temperature
    import torch

    # a flat prior: the grid's moments of the tempered likelihood
    flat = torch.zeros(1, 1, dtype=torch.float64)
    mean, sd = _grid_moments(torch.from_numpy(cell_ll), flat, torch.from_numpy(grid), temperature)
    return {"t_mean": mean.numpy(), "t_sd": sd.numpy(), "temperature": temperature, "n_eff": n_eff}


def _isotonic(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centred isotonic regression of ``y`` on ``x`` (Oron & Flournoy 2017), as knots for ``np.interp``.

    Pool adjacent violators gives the non-decreasing least-squares fit, a staircase; each
    pooled block is then one knot at its mean ``x`` and mean ``y``, so the map is
    piecewise linear and increasing. (A staircase maps a short interval to zero width
    inside a step and to a whole step across one: on a clock known exactly, nominal 90%
    intervals covered 83%.)
    """
    order = np.argsort(x, kind="stable")
    # blocks of pooled points: sums of x and y, and how many points each holds
    sx: list[float] = []
    sy: list[float] = []
    n: list[int] = []
    for xi, yi in zip(x[order], y[order], strict=True):
        sx.append(float(xi))
        sy.append(float(yi))
        n.append(1)
        while len(n) > 1 and sy[-2] * n[-1] >= sy[-1] * n[-2]:
            last_x, last_y, last_n = sx.pop(), sy.pop(), n.pop()
            sx[-1] += last_x
            sy[-1] += last_y
            n[-1] += last_n
    counts = np.asarray(n, dtype=np.float64)
    return np.asarray(sx) / counts, np.asarray(sy) / counts


@dataclasses.dataclass
class _Run:
    """What every training stage of one fit shares, and the progress step it advances."""

    module: VAEModule
    tensors: _Tensors
    train_idx: np.ndarray
    test_idx: np.ndarray
    generator: torch.Generator
    history: dict[str, list[float]]
    progress: ProgressCallback | None
    total: int
    step: int = 0

    def advance(self, message: str) -> None:
        """One more step done: report it."""
        self.step += 1
        report(self.progress, self.step, self.total, message)


class _Tensors:
    """The data on the device: ``Mu``, ``Ms`` ``(n_obs, G)``, their spreads, the time prior ``(n_obs, 1)``."""

    def __init__(
        self,
        *,
        u: torch.Tensor,
        s: torch.Tensor,
        std_u: torch.Tensor,
        std_s: torch.Tensor,
        prior_mean: torch.Tensor,
        prior_sd: torch.Tensor,
    ) -> None:
        self.u, self.s, self.std_u, self.std_s = u, s, std_u, std_s
        self.prior_mean, self.prior_sd = prior_mean, prior_sd

    def x(self, idx: Any) -> torch.Tensor:
        """The encoder's input for cells ``idx``: ``[u / std_u, s / std_s]``, ``(len(idx), 2 G)``.

        Made per batch, not held for every cell (160 MB at 100,000 cells and 200 genes);
        float32 division, so the same numbers as numpy's whole array.
        """
        import torch

        return torch.cat([self.u[idx] / self.std_u, self.s[idx] / self.std_s], 1)


def _decode_chunks(n: int, decode: Callable[[slice], Any], fields: tuple[str, ...]) -> Any:
    """A :class:`~explorer.models._vae_module.Decoded` of ``n`` cells, ``decode(cells)`` ``_CHUNK`` at a time.

    ``fields``: the ones kept (the others are None), each written a chunk at a time into
    its ``(n, G)`` array, so that a chunk's other outputs and a second copy of the whole
    are never held (as concatenating the chunks did: 1.6 GB at 100,000 cells).
    """
    import torch

    from explorer.models._vae_module import Decoded

    whole: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for start in range(0, n, _CHUNK):
            sl = slice(start, start + _CHUNK)
            part = decode(sl)
            for f in fields:
                value = getattr(part, f)
                if f not in whole:
                    whole[f] = value.new_empty((n, *value.shape[1:]))
                whole[f][sl] = value
    return Decoded(*(whole.get(f) for f in _DECODED))


def _adam(params: Any, lr: float | None = None) -> torch.optim.Optimizer:
    """Adam (as the paper), fused: one kernel per step over all parameters.

    The same update as the default, up to rounding; on the pancreas' encoder and decoder
    (about 2 million weights) a CPU step took 2 ms instead of 10 (21 steps an epoch).
    """
    import torch

    return torch.optim.Adam(params, fused=True) if lr is None else torch.optim.Adam(params, lr=lr, fused=True)


def _take(x0: InitialState | None, idx: Any) -> InitialState | None:
    if x0 is None:
        return None
    from explorer.models._vae_module import InitialState

    return InitialState(x0.u0[idx], x0.s0[idx], x0.t0[idx])


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(n,)`` cosine similarity of the rows of ``a`` and ``b`` (0 for a zero row)."""
    num = (a * b).sum(1)
    den = a.norm(dim=1) * b.norm(dim=1)
    return num / den.clamp(min=1e-12)
