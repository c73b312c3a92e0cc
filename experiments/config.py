"""The configuration of one training run: a typed dataclass, one default per field.

A :class:`TrainConfig` fixes everything of a run except the dataset, the method and the
seed: the optimisation (epochs, batch, optimizer, learning rate and schedule), the model
(encoders, fusion, widths), the statistics (``bj.source_grad_stats`` options) and every
method's hyper-parameters. Each field has its one default here; the command line
(``experiments.run``) and the search (``experiments.tune``) only override fields.
:data:`DATASET_DEFAULTS` holds the per-dataset epochs and batch size, and
:func:`dataset_config` applies them.

Records store :func:`record_config` (every field, plus the run's data seed and
validation fraction); :func:`same_config` compares two stored configurations, reading a
field absent from an older record as that field's default (a field is only ever added
with the default that reproduces the runs made before it existed).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from experiments import models

OPTIMIZERS = ("adam", "sgd")
LR_SCHEDULES = ("constant", "cosine")
STATS_METHODS = ("auto", "vmap", "fast")
NOISES = ("absolute", "relative")
LAPLACE_CENTERS = ("batch", "draws")

# Per-dataset epochs and batch size: small enough for a CPU, long enough to converge.
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "avdigits": {"epochs": 8, "batch_size": 64},
    "avdigits_rep": {"epochs": 8, "batch_size": 64},
    "utdmhad2": {"epochs": 40, "batch_size": 32},
    "utdmhad3": {"epochs": 40, "batch_size": 32},
    "ucimf": {"epochs": 20, "batch_size": 32},
    "ucimf2": {"epochs": 20, "batch_size": 32},
    "basicmotions": {"epochs": 60, "batch_size": 8},
    # 5 epochs: one method x 5 seeds in 2 (joint) to 5 (bogc) minutes on 2 busy CPU cores.
    "cgmnist": {"epochs": 5, "batch_size": 64},
}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines one training run except the dataset, method and seed.

    Attributes:
      epochs: passes over the training split (``>= 1``).
      batch_size: examples per step; the last partial batch of an epoch is dropped.
      optimizer: ``"adam"`` or ``"sgd"`` (with ``momentum``).
      lr: the learning rate; ``None`` picks 1e-3 for Adam, 1e-2 for SGD.
      momentum: SGD's momentum (0: plain SGD).
      lr_schedule: ``"constant"`` or ``"cosine"`` (decay to 0 over the run).
      encoder, fusion, feature_dim, hidden, channels: the model
        (:class:`experiments.models.ModelConfig`).
      stats_method: ``method=`` of ``bj.source_grad_stats`` (BOGC, its Laplace reading).
      stats_chunk: ``chunk_size=`` of ``bj.source_grad_stats``.
      probe_l2: the ridge of the linear probes, relative to the Gram matrix's mean diagonal.
      kappa: BOGC's evidence strength.
      gamma: BOGC's evidence sharpness (variants with their own fixed gamma ignore it).
      noise: BOGC's noise scale, ``"absolute"`` or ``"relative"``; ``None``: the method's own.
      rho: CGGM's magnitude scale.
      cggm_lambda: the weight of CGGM's direction term.
      alpha: OGM-GE's modulation strength.
      pareto_gamma: MMPareto's magnitude exponent.
      laplace_samples: draws of ``bogc_laplace``'s posterior per step.
      laplace_damping: ``bogc_laplace``'s prior precision.
      laplace_center: ``bogc_laplace``'s means: ``"batch"`` (the batch gradients) or
        ``"draws"`` (the draws' average).
      rep_power: the representation methods' variance power ``p``; ``None``: the
        method's own (``experiments.representation_methods``).
      rep_prior_variance: the representation methods' head prior ``N(0, gamma I)``;
        ``None``: the method's own (0.005).
    """

    epochs: int = 10
    batch_size: int = 64
    optimizer: str = "adam"
    lr: float | None = None
    momentum: float = 0.9
    lr_schedule: str = "constant"
    encoder: str = "auto"
    fusion: str = "concat"
    feature_dim: int = 64
    hidden: int = 128
    channels: tuple[int, ...] = (16, 32)
    stats_method: str = "auto"
    stats_chunk: int | None = None
    probe_l2: float = 1e-2
    kappa: float = 1.0
    gamma: float = 1.0
    noise: str | None = None
    rho: float = 1.3
    cggm_lambda: float = 0.1
    alpha: float = 0.1
    pareto_gamma: float = 1.5
    laplace_samples: int = 8
    laplace_damping: float = 1.0
    laplace_center: str = "batch"
    rep_power: float | None = None
    rep_prior_variance: float | None = None

    def __post_init__(self):
        if self.lr is None:
            object.__setattr__(self, "lr", 1e-3 if self.optimizer == "adam" else 1e-2)
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        for name in ("epochs", "batch_size", "feature_dim", "hidden", "laplace_samples"):
            _check_positive_int(name, getattr(self, name))
        if self.stats_chunk is not None:
            _check_positive_int("stats_chunk", self.stats_chunk)
        if not self.channels or min(self.channels) < 1:
            raise ValueError(
                f"TrainConfig: channels must be positive channel counts; got {self.channels}."
            )
        for name, choices in (
            ("optimizer", OPTIMIZERS),
            ("lr_schedule", LR_SCHEDULES),
            ("encoder", models.ENCODERS),
            ("fusion", models.FUSIONS),
            ("stats_method", STATS_METHODS),
            ("laplace_center", LAPLACE_CENTERS),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(
                    f"TrainConfig: {name} must be one of {choices}; got {getattr(self, name)!r}."
                )
        if self.noise is not None and self.noise not in NOISES:
            raise ValueError(
                f"TrainConfig: noise must be None (the method's own) or one of {NOISES}; "
                f"got {self.noise!r}."
            )
        if not self.lr > 0:  # type: ignore[operator]
            raise ValueError(f"TrainConfig: lr must be > 0; got {self.lr}.")
        for name in ("momentum", "probe_l2", "laplace_damping"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"TrainConfig: {name} must be >= 0; got {getattr(self, name)}.")
        if self.rep_power is not None and not self.rep_power >= 0:
            raise ValueError(f"TrainConfig: rep_power must be >= 0; got {self.rep_power}.")
        if self.rep_prior_variance is not None and not self.rep_prior_variance > 0:
            raise ValueError(
                f"TrainConfig: rep_prior_variance must be > 0; got {self.rep_prior_variance}."
            )

    def model_config(self) -> models.ModelConfig:
        """The model part: :class:`experiments.models.ModelConfig`."""
        return models.ModelConfig(
            encoder=self.encoder,
            fusion=self.fusion,
            feature_dim=self.feature_dim,
            hidden=self.hidden,
            channels=self.channels,
        )


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"TrainConfig: {name} must be a positive integer; got {value!r}.")


def dataset_config(dataset: str, **overrides: Any) -> TrainConfig:
    """The configuration for ``dataset``: its :data:`DATASET_DEFAULTS`, then ``overrides``.

    Correlation-dial variants (``cgmnist90``) share their family's defaults (``cgmnist``).
    """
    defaults = DATASET_DEFAULTS.get(dataset)
    if defaults is None:
        family = dataset.rstrip("0123456789")
        defaults = DATASET_DEFAULTS.get(family, {})
    return TrainConfig(**{**defaults, **overrides})


def record_config(cfg: TrainConfig, *, data_seed: int, validation: float | None) -> dict:
    """The configuration a record stores: every field, the data seed and the validation
    fraction (``None``: the test split), as JSON values."""
    out = dataclasses.asdict(cfg)
    out["channels"] = list(cfg.channels)
    return {**out, "data_seed": data_seed, "validation": validation}


_DEFAULTS = {
    f.name: (list(f.default) if isinstance(f.default, tuple) else f.default)
    for f in dataclasses.fields(TrainConfig)
}


def same_config(a: dict, b: dict) -> bool:
    """Whether two stored configurations describe the same runs; a field missing from one
    counts as its :class:`TrainConfig` default."""
    keys = set(a) | set(b)
    return all(a.get(k, _DEFAULTS.get(k)) == b.get(k, _DEFAULTS.get(k)) for k in keys)
