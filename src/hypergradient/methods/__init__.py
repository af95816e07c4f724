"""Hypergradient methods: the protocol in ``base``, one file per method."""

from .base import Method as Method
from .base import Segmented as Segmented
from .base import Solution as Solution
from .drmad import DrMAD as DrMAD
from .es import ES as ES
from .forward import Forward as Forward
from .implicit import Implicit as Implicit
from .pes import NRES as NRES
from .pes import PES as PES
from .reverse import Reverse as Reverse
from .reversible import Reversible as Reversible
from .truncated import Truncated as Truncated
