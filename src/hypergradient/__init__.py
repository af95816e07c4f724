"""hypergradient: tune hyperparameters by gradient descent through the training run."""

from . import data as data
from . import optim as optim
from .data import Batches as Batches
from .errors import CheckpointMismatchError as CheckpointMismatchError
from .errors import DivergenceError as DivergenceError
from .errors import Failure as Failure
from .errors import HyperDivergenceError as HyperDivergenceError
from .errors import MethodError as MethodError
from .errors import ReversalError as ReversalError
from .dynamics import Dynamics as Dynamics
from .dynamics import State as State
from .methods import DrMAD as DrMAD
from .methods import Forward as Forward
from .methods import HypergradResult as HypergradResult
from .methods import Implicit as Implicit
from .methods import Method as Method
from .methods import Reverse as Reverse
from .methods import Reversible as Reversible
from .methods import Truncated as Truncated
from .methods import hypergrad as hypergrad
from .drivers import constraints as constraints
from .drivers.offline import OptimizeResult as OptimizeResult
from .drivers.offline import optimize as optimize
from .drivers.online import online as online

__version__ = "0.1.0"
