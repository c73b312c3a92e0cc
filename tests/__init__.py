"""The test suite (a package, so that ``python -m tests.parity.bayesagg`` finds it first)."""
