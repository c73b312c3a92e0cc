"""bogc_jax: balanced multimodal learning as composable Optax gradient transformations."""

from bogc_jax import (
    evidence,
    head_posterior,
    labels,
    metrics,
    representation_moments,
    representation_weights,
)
from bogc_jax._fast_stats import fast_stats_plan
from bogc_jax._version import __version__
from bogc_jax.accumulate import AccumulationState, multi_steps
from bogc_jax.baselines import MMParetoState, OgmGeState, mmpareto, ogm_ge, ogm_ge_coefficients
from bogc_jax.bayesagg import bayesagg_mtl
from bogc_jax.bogc import BogcState, bogc, coordinate_weights
from bogc_jax.cggm import CggmState, cggm, cggm_coefficients, cggm_direction_loss
from bogc_jax.labels import label_params
from bogc_jax.laplace import laplace_grad_stats
from bogc_jax.representation import (
    HeadState,
    RepresentationCalibration,
    RepresentationInfo,
    RepresentationState,
    representation_bogc,
)
from bogc_jax.representation_heads import LinearHead
from bogc_jax.stats import GradStats, merge_grad_stats, source_grad_stats
