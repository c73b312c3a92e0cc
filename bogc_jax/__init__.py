"""bogc_jax: balanced multimodal learning as composable Optax gradient transformations."""

from bogc_jax import evidence
from bogc_jax import labels
from bogc_jax import metrics
from bogc_jax.accumulate import AccumulationState
from bogc_jax.accumulate import multi_steps
from bogc_jax.baselines import MMParetoState
from bogc_jax.baselines import OgmGeState
from bogc_jax.baselines import mmpareto
from bogc_jax.baselines import ogm_ge
from bogc_jax.baselines import ogm_ge_coefficients
from bogc_jax.bogc import BogcState
from bogc_jax.bogc import bogc
from bogc_jax.bogc import coordinate_weights
from bogc_jax.cggm import CggmState
from bogc_jax.cggm import cggm
from bogc_jax.cggm import cggm_coefficients
from bogc_jax.cggm import cggm_direction_loss
from bogc_jax.labels import label_params
from bogc_jax.fast_stats import fast_stats_plan
from bogc_jax.laplace import laplace_grad_stats
from bogc_jax.stats import GradStats
from bogc_jax.stats import merge_grad_stats
from bogc_jax.stats import source_grad_stats

__version__ = "0.1.0"
