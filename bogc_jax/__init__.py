"""bogc_jax: balanced multimodal learning as composable Optax gradient transformations."""

from bogc_jax import (
    evidence,
    head_posterior,
    labels,
    metrics,
    representation_moments,
    representation_weights,
    weightings,
)
from bogc_jax._fast_stats import fast_stats_plan
from bogc_jax._version import __version__
from bogc_jax.accumulate import AccumulationState, multi_steps
from bogc_jax.bayesagg import bayesagg_mtl
from bogc_jax.bogc import BogcState, bogc, coordinate_weights
from bogc_jax.cggm import CggmState, cggm, cggm_coefficients, cggm_direction_loss
from bogc_jax.labels import label_params
from bogc_jax.laplace import laplace_grad_stats
from bogc_jax.mmpareto import MMParetoState, mmpareto
from bogc_jax.ogm_ge import OgmGeState, ogm_ge, ogm_ge_coefficients
from bogc_jax.representation import (
    HeadState,
    RepresentationCalibration,
    RepresentationInfo,
    RepresentationState,
    representation_bogc,
)
from bogc_jax.representation_heads import LinearHead
from bogc_jax.stats import GradStats, merge_grad_stats, source_grad_means, source_grad_stats

__all__ = [
    "AccumulationState",
    "BogcState",
    "CggmState",
    "GradStats",
    "HeadState",
    "LinearHead",
    "MMParetoState",
    "OgmGeState",
    "RepresentationCalibration",
    "RepresentationInfo",
    "RepresentationState",
    "__version__",
    "bayesagg_mtl",
    "bogc",
    "cggm",
    "cggm_coefficients",
    "cggm_direction_loss",
    "coordinate_weights",
    "evidence",
    "fast_stats_plan",
    "head_posterior",
    "label_params",
    "labels",
    "laplace_grad_stats",
    "merge_grad_stats",
    "metrics",
    "mmpareto",
    "multi_steps",
    "ogm_ge",
    "ogm_ge_coefficients",
    "representation_bogc",
    "representation_moments",
    "representation_weights",
    "source_grad_means",
    "source_grad_stats",
    "weightings",
]
