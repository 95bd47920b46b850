"""Benchmarks of lore_jax: scripts that print tables and write JSON, not timed tests.

Run one with ``python -m benchmarks.<name> --help``, or all of them with
``python -m benchmarks.run_all``. This package must not import JAX: every script sets
``XLA_FLAGS`` (8 simulated host devices) before its own ``import jax``.
"""
