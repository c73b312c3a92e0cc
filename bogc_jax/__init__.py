"""bogc_jax: balanced multimodal learning as composable Optax gradient transformations."""

from bogc_jax import evidence
from bogc_jax.bogc import BogcState
from bogc_jax.bogc import bogc
from bogc_jax.laplace import laplace_grad_stats
from bogc_jax.stats import GradStats
from bogc_jax.stats import merge_grad_stats
from bogc_jax.stats import source_grad_stats

__version__ = "0.1.0"
