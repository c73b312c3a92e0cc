"""Parity checks of the library against reference outputs (runnable as modules)."""
