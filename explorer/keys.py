"""Every AnnData key explorer reads or writes, defined once.

The names follow scVelo's conventions so that our files open in scVelo and CellRank
and theirs in ours. One deliberate change: cell-by-cell matrices (``velocity_graph``,
``velocity_graph_neg``) live in ``obsp`` so that they subset with the cells; readers
also accept them from ``uns`` as scVelo writes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping


@dataclass(frozen=True, slots=True)
class _Layers:
    SPLICED: str = "spliced"
    UNSPLICED: str = "unspliced"
    MS: str = "Ms"
    MU: str = "Mu"
    VELOCITY: str = "velocity"
    VELOCITY_U: str = "velocity_u"
    FIT_T: str = "fit_t"
    #: simulator ground truth: noise-free abundances and true velocity
    TRUE_S: str = "true_s"
    TRUE_U: str = "true_u"
    TRUE_VELOCITY: str = "true_velocity"
    #: a model's per-cell prediction of (u, s) at the cell's own time and state (VeloVAE's
    #: u_hat, s_hat): models whose fit is not one curve per gene show these points
    PREDICTED_U: str = "predicted_u"
    PREDICTED_S: str = "predicted_s"
    #: per-cell, per-gene kinetic rates (DeepVelo), NaN for genes not fitted
    RATE_ALPHA: str = "rate_alpha"
    RATE_BETA: str = "rate_beta"
    RATE_GAMMA: str = "rate_gamma"
    #: VeloVAE: per-cell relative transcription rate rho = g(c) in [0, 1] (full model)
    RHO: str = "rho"
    #: VeloVAE: per-cell, per-gene variance of the spliced velocity over posterior samples of
    #: (t, c) (mean in ``velocity``); the fates kernel's stochastic and Monte Carlo modes use it
    VELOCITY_VARIANCE: str = "velocity_variance"


@dataclass(frozen=True, slots=True)
class _Var:
    HIGHLY_VARIABLE: str = "highly_variable"
    GENE_COUNT_CORR: str = "gene_count_corr"
    # steady-state / stochastic
    GAMMA: str = "velocity_gamma"
    R2: str = "velocity_r2"
    OFFSET: str = "velocity_offset"
    OFFSET2: str = "velocity_offset2"
    VELOCITY_GENES: str = "velocity_genes"
    # dynamical (scVelo's fit_* names)
    FIT_ALPHA: str = "fit_alpha"
    FIT_BETA: str = "fit_beta"
    FIT_GAMMA: str = "fit_gamma"
    FIT_T_: str = "fit_t_"
    FIT_SCALING: str = "fit_scaling"
    FIT_STD_U: str = "fit_std_u"
    FIT_STD_S: str = "fit_std_s"
    FIT_LIKELIHOOD: str = "fit_likelihood"
    FIT_U0: str = "fit_u0"
    FIT_S0: str = "fit_s0"
    FIT_T_ON: str = "fit_t_on"
    FIT_R2: str = "fit_r2"
    FIT_KINETIC_SIGNAL: str = "fit_kinetic_signal"
    FIT_DETECTION_POWER: str = "fit_detection_power"
    #: scVelo's factor that stretched the gene's time to t_max (align_dynamics)
    FIT_ALIGNMENT_SCALING: str = "fit_alignment_scaling"
    #: whether the onset time t_on improved the gene's fit on the shared time axis
    FIT_USES_T_ON: str = "fit_uses_t_on"
    #: share by which t_on lowered the gene's shared-time loss
    FIT_T_ON_GAIN: str = "fit_t_on_gain"
    #: cells that carried weight for the gene in its EM iterations (all cells: final assignment)
    FIT_N_CELLS_EM: str = "fit_n_cells_em"
    #: share of cells in each of scVelo's four states
    FIT_FRAC_INDUCTION: str = "fit_frac_induction"
    FIT_FRAC_REPRESSION: str = "fit_frac_repression"
    FIT_FRAC_STEADY_ON: str = "fit_frac_steady_on"
    FIT_FRAC_STEADY_OFF: str = "fit_frac_steady_off"
    #: VeloVAE: per-gene Gaussian noise of Mu and Ms
    FIT_SIGMA_U: str = "fit_sigma_u"
    FIT_SIGMA_S: str = "fit_sigma_s"
    #: VeloVAE: per-gene reconstruction MSE on training and held-out cells
    FIT_MSE_TRAIN: str = "fit_mse_train"
    FIT_MSE_TEST: str = "fit_mse_test"
    #: DeepVelo: median over cells of the per-cell rates (layers rate_alpha/beta/gamma)
    FIT_RATE_ALPHA: str = "fit_rate_alpha"
    FIT_RATE_BETA: str = "fit_rate_beta"
    FIT_RATE_GAMMA: str = "fit_rate_gamma"
    #: DeepVelo: per gene, the correlation over cells of the spliced velocity with the mean
    #: displacement to each cell's forward minus backward candidates (its training target)
    FIT_DISPLACEMENT_R: str = "fit_displacement_r"
    #: trust diagnostics (explorer.diagnostics); scVelo's names for its differential
    #: kinetic test: clusters with p < 0.01 (comma-joined) and the largest of those p-values
    FIT_DIFF_KINETICS: str = "fit_diff_kinetics"
    FIT_PVAL_KINETICS: str = "fit_pval_kinetics"
    DIAG_DK_MIN_PVAL: str = "diag_dk_min_pval"
    DIAG_DK_N_CLUSTERS: str = "diag_dk_n_clusters"
    DIAG_BOOST_SCORE: str = "diag_boost_score"
    DIAG_BOOST_ABOVE: str = "diag_boost_above"
    DIAG_BOOST_KINK: str = "diag_boost_kink"
    DIAG_BOOST: str = "diag_boost"
    DIAG_RATE_SD: str = "diag_rate_sd"
    DIAG_SIGN_AGREEMENT: str = "diag_sign_agreement"
    DIAG_N_REFITS: str = "diag_n_refits"
    DIAG_FLAGGED: str = "diag_flagged"
    DIAG_FLAG_REASON: str = "diag_flag_reason"
    # simulator ground truth
    TRUE_ALPHA: str = "true_alpha"
    TRUE_BETA: str = "true_beta"
    TRUE_GAMMA: str = "true_gamma"
    TRUE_T_: str = "true_t_"
    TRUE_T_ON: str = "true_t_on"
    TRUE_SCALING: str = "true_scaling"
    TRUE_KIND: str = "true_kind"
    #: gamma in the second kinetic regime (``true_gamma`` elsewhere), "two_regimes" genes
    TRUE_GAMMA_2: str = "true_gamma_2"
    #: factor on alpha from ``true_t_boost`` to ``true_t_`` ("boost" genes; 1 elsewhere)
    TRUE_BOOST: str = "true_boost"
    TRUE_T_BOOST: str = "true_t_boost"
    #: lineage a gene is induced in ("shared" or a lineage name)
    TRUE_PROGRAM: str = "true_program"


@dataclass(frozen=True, slots=True)
class _Obs:
    LATENT_TIME: str = "latent_time"
    VELOCITY_CONFIDENCE: str = "velocity_confidence"
    VELOCITY_LENGTH: str = "velocity_length"
    VELOCITY_UNCERTAINTY: str = "velocity_uncertainty"
    #: VeloVAE: posterior standard deviation of latent_time (same [0, 1] scale), and
    #: its coefficient of variation on the model's own clock
    LATENT_TIME_STD: str = "latent_time_std"
    LATENT_TIME_CV: str = "latent_time_cv"
    #: VeloVAE: each cell's rank distance between its two initial times (steady-state fit,
    #: diffusion pseudotime), a share of the cells: where the start, not the data, sets the time
    LATENT_TIME_START_SPREAD: str = "latent_time_start_spread"
    #: VeloVAE: the width of each cell's 90% interval of place in the ordering, a share of the
    #: cells: the posterior interval counted in cells, with the start spread as a two-point mixture
    LATENT_TIME_RANK_WIDTH: str = "latent_time_rank_width"
    #: VeloVAE (time_sd="two_starts"): the grid posterior's own SD of latent_time (same scale),
    #: before the second start's disagreement is added to latent_time_std
    LATENT_TIME_STD_POSTERIOR: str = "latent_time_std_posterior"
    #: VeloVAE (time_sd="two_starts"): where a second fit from the other initial time places
    #: the cell (its rank there, on this fit's clock) minus where this fit does, latent_time scale
    LATENT_TIME_START_SHIFT: str = "latent_time_start_shift"
    #: VeloVAE: posterior mean time on the model's own clock (that of fit_t_on, fit_t_)
    LATENT_TIME_MODEL: str = "latent_time_model"
    #: VeloVAE: whether the cell was in the seeded training split (else held out)
    FIT_TRAIN: str = "fit_train"
    #: scVelo: transition confidence (velocity vs the expected displacement under T)
    VELOCITY_CONFIDENCE_TRANSITION: str = "velocity_confidence_transition"
    #: scVelo: self-transition probability from the velocity graph (98th-percentile rule)
    VELOCITY_SELF_TRANSITION: str = "velocity_self_transition"
    ROOT_CELLS: str = "root_cells"
    #: DeepVelo's consistency scores: mean cosine of a cell's velocity with its
    #: neighbours' (overall) and with all cells of its type (cell-type-wise)
    VELOCITY_CONSISTENCY: str = "velocity_consistency"
    VELOCITY_CONSISTENCY_TYPE: str = "velocity_consistency_type"
    END_POINTS: str = "end_points"
    N_COUNTS: str = "n_counts"
    INITIAL_SIZE: str = "initial_size"
    INITIAL_SIZE_SPLICED: str = "initial_size_spliced"
    INITIAL_SIZE_UNSPLICED: str = "initial_size_unspliced"
    # simulator ground truth
    TRUE_T: str = "true_t"
    TRUE_LINEAGE: str = "true_lineage"
    #: kinetic regime (0 or 1) of the cell for "two_regimes" genes
    TRUE_REGIME: str = "true_regime"
    TRUE_SIZE_FACTOR: str = "true_size_factor"
    CLUSTERS: str = "clusters"
    #: CellRank 2's fate keys (explorer.graph.fates): categorical states, NaN for cells in none
    MACROSTATES: str = "macrostates_fwd"
    TERMINAL_STATES: str = "term_states_fwd"
    TERMINAL_STATES_PROBS: str = "term_states_fwd_probs"
    INITIAL_STATES: str = "init_states_fwd"
    INITIAL_STATES_PROBS: str = "init_states_fwd_probs"
    #: learned vector field (explorer.models.vector_field): divergence (trace of the
    #: Jacobian), curl magnitude (sqrt(2) ||(J - J^T) / 2||_F) and speed ||f|| per cell
    VF_DIVERGENCE: str = "vf_divergence"
    VF_CURL: str = "vf_curl"
    VF_SPEED: str = "vf_speed"


@dataclass(frozen=True, slots=True)
class _Obsm:
    PCA: str = "X_pca"
    UMAP: str = "X_umap"
    #: VeloVAE: posterior mean and standard deviation of the cell state c
    CELL_STATE: str = "cell_state"
    CELL_STATE_STD: str = "cell_state_std"
    #: UMAP of the cells' per-cell rate vectors (DeepVelo; explorer.models.gcn.compute_rate_umap)
    RATES_UMAP: str = "X_rates_umap"
    #: CellRank 2's fate keys (explorer.graph.fates): (n_obs, n_states) arrays whose columns
    #: are the categories of the matching obs key; absorption times are a DataFrame
    FATE_PROBABILITIES: str = "lineages_fwd"
    ABSORPTION_TIMES: str = "absorption_times_fwd"
    MACROSTATES_MEMBERSHIPS: str = "macrostates_fwd_memberships"
    TERMINAL_STATES_MEMBERSHIPS: str = "term_states_fwd_memberships"
    INITIAL_STATES_MEMBERSHIPS: str = "init_states_fwd_memberships"
    SCHUR_VECTORS: str = "schur_vectors_fwd"
    #: learned vector field: each cell's state x (PCA of log1p(Ms) or a latent space),
    #: the field f(x) there, and per-cell gene-pair Jacobians (DataFrame)
    VF_STATE: str = "vf_state"
    VF_VELOCITY: str = "vf_velocity"
    VF_JACOBIAN: str = "vf_jacobian"

    @staticmethod
    def vf_velocity(basis: str) -> str:
        """Key of the learned field carried onto ``X_<basis>``: ``vf_velocity_<basis>``."""
        return f"vf_velocity_{basis.removeprefix('X_')}"

    @staticmethod
    def velocity(basis: str) -> str:
        """Key of the velocity projected on ``X_<basis>``: ``velocity_<basis>``."""
        return f"velocity_{basis.removeprefix('X_')}"

    @staticmethod
    def embedding(basis: str) -> str:
        """Key of an embedding: ``X_<basis>`` (accepts ``umap`` or ``X_umap``)."""
        return basis if basis.startswith("X_") else f"X_{basis}"


@dataclass(frozen=True, slots=True)
class _Obsp:
    CONNECTIVITIES: str = "connectivities"
    DISTANCES: str = "distances"
    VELOCITY_GRAPH: str = "velocity_graph"
    VELOCITY_GRAPH_NEG: str = "velocity_graph_neg"
    TRANSITIONS: str = "T_fwd"
    #: CellRank's key for the backward (transposed) transition matrix
    TRANSITIONS_BACKWARD: str = "T_bwd"


@dataclass(frozen=True, slots=True)
class _Varm:
    #: CellRank 2's fate drivers: DataFrame with <lineage>_corr/_pval/_qval/_ci_low/_ci_high
    LINEAGE_DRIVERS: str = "terminal_lineage_drivers"
    #: scVelo's differential kinetic test: (n_vars, n_clusters) p-values (explorer.diagnostics)
    PVALS_KINETICS: str = "fit_pvals_kinetics"
    #: learned vector field: loadings W of its PCA state (zero rows for genes outside it)
    VF_LOADINGS: str = "vf_loadings"


@dataclass(frozen=True, slots=True)
class _Uns:
    NEIGHBORS: str = "neighbors"
    PCA: str = "pca"
    VELOCITY_PARAMS: str = "velocity_params"
    #: sub-keys of ``uns["velocity_params"]`` that scVelo reads: bases with an up-to-date
    #: ``velocity_<basis>`` (else ``scv.pl.velocity_embedding_stream`` recomputes it) and
    #: the neighbour set the velocity graph was computed on
    EMBEDDINGS: str = "embeddings"
    MODE_NEIGHBORS: str = "mode_neighbors"
    N_RECURSE_NEIGHBORS: str = "n_recurse_neighbors"
    STREAMLINES: str = "velocity_streamlines"
    SIMULATION: str = "simulation"
    PREPROCESS: str = "explorer_preprocess"
    #: scanpy's marker that X holds log1p values (``{"base": None}``)
    LOG1P: str = "log1p"
    UMAP: str = "umap"
    #: CellRank's record of how T_fwd was made: {"params": {...}, "init": {...}}
    TRANSITIONS_PARAMS: str = "T_fwd_params"
    #: CellRank 2's GPCCA keys (explorer.graph.fates)
    COARSE_TRANSITIONS: str = "coarse_fwd"
    SCHUR_MATRIX: str = "schur_matrix_fwd"
    EIGENDECOMPOSITION: str = "eigendecomposition_fwd"
    ESTIMATOR_PARAMS: str = "fwd_estimator_params"
    #: learned vector field: network weights, state space, time step, fixed points, grid
    VECTOR_FIELD: str = "vector_field"

    @staticmethod
    def colors(key: str) -> str:
        """Key of the colours of the categories of ``obs[key]``: ``<key>_colors``."""
        return f"{key}_colors"


class Key:
    """AnnData keys by slot: ``Key.layers.MS``, ``Key.obsp.VELOCITY_GRAPH``, ..."""

    layers = _Layers()
    var = _Var()
    obs = _Obs()
    obsm = _Obsm()
    obsp = _Obsp()
    varm = _Varm()
    uns = _Uns()


def drop_keys(where: Mapping[str, tuple[Any, Iterable[str]]]) -> list[str]:
    """Delete ``keys`` from each ``store`` of ``{slot: (store, keys)}`` (an AnnData's ``obs``, ``uns``...).

    Returns
    -------
    The keys removed, as ``"obs['term_states_fwd']"``...; empty where there were none.
    """
    removed = []
    for slot, (store, keys) in where.items():
        for key in keys:
            if key in store:
                del store[key]
                removed.append(f"{slot}[{key!r}]")
    return removed
