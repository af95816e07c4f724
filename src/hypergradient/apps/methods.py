"""Hypergradient methods by name: the one table that the CLI, ``compare`` and the benchmarks read.

    make("truncated", truncation=10)   # hg.Truncated(10)
    METHODS["rtho"].realtime           # True: tuned during one run with hg.online
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import hypergradient as hg
from hypergradient.errors import UnknownMethodError


@dataclasses.dataclass(frozen=True)
class Entry:
    """One method name: what it does, how to build it, and which driver runs it.

    Attributes:
      help: one line for ``--help`` and listings.
      build: ``(truncation, checkpoint_every) -> hg.Method``.
      realtime: ``True`` when λ is tuned during one training run (``hg.online``), ``False``
        for one full training run per hyper-step (``hg.optimize``).
    """

    help: str
    build: Callable[[int, int], hg.Method]
    realtime: bool = False


METHODS: dict[str, Entry] = {
    "reverse": Entry("Reverse-HG: backpropagation through the whole training run (exact; memory ~T·d)",
                     lambda k, c: hg.Reverse()),
    "checkpoint": Entry("Reverse-HG storing every C-th state, segments recomputed (exact; memory ~(T/C + C)·d)",
                        lambda k, c: hg.Reverse(checkpoint_every=c)),
    "forward": Entry("Forward-HG: tangents carried along the run (exact; time ~m× a training run)",
                     lambda k, c: hg.Forward()),
    "truncated": Entry("reverse through the last K steps only (biased; memory ~K·d)",
                       lambda k, c: hg.Truncated(k)),
    "reversible": Entry("Maclaurin et al.: exact reversal of momentum SGD in fixed point (memory ~d)",
                        lambda k, c: hg.Reversible()),
    "drmad": Entry("DrMAD: reverse pass along the straight line from w_0 to w_T (approximate; memory ~2d)",
                   lambda k, c: hg.DrMAD()),
    "auto": Entry("the fastest exact method whose program fits in memory (hg.Auto; `hypergradient plan` shows why)",
                  lambda k, c: hg.Auto()),
    "implicit": Entry("implicit function theorem at w_T (exact at a stationary point; memory ~d)",
                      lambda k, c: hg.Implicit()),
    "es": Entry("evolution strategies: 2N antithetic perturbed runs, no derivative (smoothed; for chaotic runs)",
                lambda k, c: hg.ES()),
    "rtho": Entry("real-time forward (RTHO): λ updated every Δ steps of one run, tangent carried",
                  lambda k, c: hg.Forward(), realtime=True),
    "trho": Entry("real-time truncated reverse (TRHO): λ updated every Δ steps from the last K steps",
                  lambda k, c: hg.Truncated(k), realtime=True),
    "pes": Entry("real-time persistent evolution strategies: perturbed particles carried, perturbations accumulated",
                 lambda k, c: hg.PES(), realtime=True),
    "nres": Entry("real-time noise-reuse evolution strategies: one perturbation per particle for the whole run",
                  lambda k, c: hg.NRES(), realtime=True),
}


def make(name: str, truncation: int = 20, checkpoint_every: int = 50) -> hg.Method:
    """The method called ``name`` (``truncation``: K of truncated/trho; ``checkpoint_every``: C)."""
    if name not in METHODS:
        raise UnknownMethodError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name].build(int(truncation), int(checkpoint_every))
