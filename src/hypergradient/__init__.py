"""hypergradient: tune hyperparameters by gradient descent through the training run.

Layers, each importing only those above it in this list: ``dynamics``, ``data``, ``optim`` (the
training run); ``methods`` (how to differentiate it); ``hypergrad``, ``smoothness`` and
``planning`` (the entry points); ``drivers`` and ``constraints`` (tuning λ); ``apps`` (datasets,
experiments, the CLI), which the rest never imports.
"""

from . import constraints as constraints
from . import example_weights as example_weights
from . import data as data
from . import optim as optim
from .attribution import AttributionResult as AttributionResult
from .attribution import attribute as attribute
from .data import Batches as Batches
from .drivers.core import OptimizeResult as OptimizeResult
from .drivers.offline import optimize as optimize
from .drivers.online import online as online
from .drivers.progress import NoProgressMeter as NoProgressMeter
from .drivers.progress import ProgressMeter as ProgressMeter
from .drivers.progress import TextProgressMeter as TextProgressMeter
from .drivers.progress import TqdmProgressMeter as TqdmProgressMeter
from .dynamics import Dynamics as Dynamics
from .dynamics import State as State
from .errors import ChaosWarning as ChaosWarning
from .errors import CheckpointMismatchError as CheckpointMismatchError
from .errors import DivergenceError as DivergenceError
from .errors import Failure as Failure
from .errors import HyperDivergenceError as HyperDivergenceError
from .errors import ImplicitWarning as ImplicitWarning
from .errors import UnusedHyperparameterWarning as UnusedHyperparameterWarning
from .errors import MethodError as MethodError
from .errors import ReversalError as ReversalError
from .hypergrad import HypergradResult as HypergradResult
from .hypergrad import hypergrad as hypergrad
from .hypergrad import value_and_grad as value_and_grad
from .methods import DrMAD as DrMAD
from .methods import ES as ES
from .methods import Forward as Forward
from .methods import Implicit as Implicit
from .methods import Method as Method
from .methods import NRES as NRES
from .methods import PES as PES
from .methods import Reverse as Reverse
from .methods import Reversible as Reversible
from .methods import Segmented as Segmented
from .methods import Solution as Solution
from .methods import Truncated as Truncated
from .objectives import Chunked as Chunked
from .objectives import chunked as chunked
from .planning import Auto as Auto
from .planning import Plan as Plan
from .planning import plan as plan
from .smoothness import Smoothness as Smoothness
from .smoothness import smoothness as smoothness

__version__ = "0.1.0"
