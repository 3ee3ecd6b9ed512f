"""Every AnnData key explorer reads or writes, defined once.

The names follow scVelo's conventions so that our files open in scVelo and CellRank
and theirs in ours. One deliberate change: cell-by-cell matrices (``velocity_graph``,
``velocity_graph_neg``) live in ``obsp`` so that they subset with the cells; readers
also accept them from ``uns`` as scVelo writes them.
"""

from __future__ import annotations

from dataclasses import dataclass


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


@dataclass(frozen=True, slots=True)
class _Var:
    HIGHLY_VARIABLE: str = "highly_variable"
    GENE_COUNT_CORR: str = "gene_count_corr"
    # steady-state / stochastic
    GAMMA: str = "velocity_gamma"
    R2: str = "velocity_r2"
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
    # simulator ground truth
    TRUE_ALPHA: str = "true_alpha"
    TRUE_BETA: str = "true_beta"
    TRUE_GAMMA: str = "true_gamma"
    TRUE_T_: str = "true_t_"
    TRUE_T_ON: str = "true_t_on"
    TRUE_SCALING: str = "true_scaling"
    TRUE_KIND: str = "true_kind"


@dataclass(frozen=True, slots=True)
class _Obs:
    LATENT_TIME: str = "latent_time"
    VELOCITY_CONFIDENCE: str = "velocity_confidence"
    VELOCITY_LENGTH: str = "velocity_length"
    VELOCITY_UNCERTAINTY: str = "velocity_uncertainty"
    ROOT_CELLS: str = "root_cells"
    END_POINTS: str = "end_points"
    N_COUNTS: str = "n_counts"
    INITIAL_SIZE: str = "initial_size"
    INITIAL_SIZE_SPLICED: str = "initial_size_spliced"
    INITIAL_SIZE_UNSPLICED: str = "initial_size_unspliced"
    # simulator ground truth
    TRUE_T: str = "true_t"
    TRUE_LINEAGE: str = "true_lineage"
    CLUSTERS: str = "clusters"


@dataclass(frozen=True, slots=True)
class _Obsm:
    PCA: str = "X_pca"
    UMAP: str = "X_umap"

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


@dataclass(frozen=True, slots=True)
class _Uns:
    NEIGHBORS: str = "neighbors"
    PCA: str = "pca"
    VELOCITY_PARAMS: str = "velocity_params"
    STREAMLINES: str = "velocity_streamlines"
    SIMULATION: str = "simulation"
    PREPROCESS: str = "explorer_preprocess"


class Key:
    """AnnData keys by slot: ``Key.layers.MS``, ``Key.obsp.VELOCITY_GRAPH``, ..."""

    layers = _Layers()
    var = _Var()
    obs = _Obs()
    obsm = _Obsm()
    obsp = _Obsp()
    uns = _Uns()
