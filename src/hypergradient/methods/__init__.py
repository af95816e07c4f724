"""Hypergradient methods: one file per method, one entry point."""

from .base import HypergradResult as HypergradResult
from .base import Method as Method
from .drmad import DrMAD as DrMAD
from .base import hypergrad as hypergrad
from .forward import Forward as Forward
from .implicit import Implicit as Implicit
from .reverse import Reverse as Reverse
from .reversible import Reversible as Reversible
from .truncated import Truncated as Truncated
