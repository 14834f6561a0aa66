"""The ``Example:`` blocks of the public docstrings run as doctests."""
import doctest
import importlib

import pytest

MODULES = ["ot_losses.solvers.sinkhorn", "ot_losses.solvers.partial", "ot_losses.solvers.multi_assignment",
           "ot_losses.losses.swamp", "ot_losses.losses.l2rm", "ot_losses.losses.multi_sk",
           "ot_losses.losses.info_nce"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no docstring example"
    assert result.failed == 0
