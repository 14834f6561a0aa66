"""What a contender is: a callable ``fn(n_iters) -> raw`` and how to read its answer."""
import dataclasses
from typing import Any, Callable

BASELINE = "naive torch (eager)"
OURS_PREFIX = "ot_losses "


@dataclasses.dataclass
class Contender:
    """A callable ``fn(n_iters) -> raw`` and how to read its answer.

    ``solution(raw)`` returns a dict with ``f``/``g`` (our convention, plan =
    a b exp((f + g - C)/eps)) and/or ``plan`` (the plan in the reference's
    normalisation), computed outside the timed region.
    """
    fn: Callable[[int], Any]
    solution: Callable[[Any], dict]
    inputs: str = "cost"          # "cost" or "points" (the contender builds its own cost)
    same_iterates: bool = True    # runs the reference's iterates exactly (judged by tolerance)
    can_reduce: bool = False      # slow contender: may run fewer iterations (per-iteration time kept)
    note: str = ""


class Unavailable(Exception):
    """The contender does not apply here (not installed / not meaningful); it gets no row."""


def potentials(f, g):
    """A solution given by its potentials (our convention: plan = a b exp((f + g - C)/eps))."""
    return {"f": f, "g": g}


def raiser(msg):
    def fn(n_iters):
        raise RuntimeError(msg)
    return fn
