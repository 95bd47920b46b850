"""Every ``>>>`` example in lore_jax's docstrings runs and prints what it shows."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import lore_jax

MODULES = sorted(m.name for m in pkgutil.walk_packages(lore_jax.__path__, "lore_jax."))


def test_every_module_is_collected():
    assert {"lore_jax.greedylore", "lore_jax.data_parallel", "lore_jax.layout"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
                             verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed"
