"""Experiments: real multimodal datasets, Flax NNX models and a training CLI for bogc_jax."""
