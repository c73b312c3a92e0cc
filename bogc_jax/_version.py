"""The version of bogc_jax: the one place it is written (the wheel's metadata reads it)."""

__version__ = "0.1.0"
