"""Gradient against black box: random search, Optuna TPE, hypergradient descent and both at equal budget.

    hypergradient compare schedules --dataset fashion-mnist --budget-seconds 120 --seeds 2

Every method tunes the same hyperparameters λ of the same training run
(same data split, same initial weights and minibatch order for a given seed)
on the same objective, the validation cross-entropy at the final weights
f(λ) = E_val(w_T(λ)), within the same wall-clock budget per method, regime
and seed:

- ``random``: Optuna's ``RandomSampler`` (log-uniform learning rates and L2
  strengths, uniform momenta), one plain training run per trial;
- ``tpe``: Optuna's ``TPESampler``, with a ``MedianPruner`` on the validation
  loss after each quarter of the training run;
- ``hypergradient``: ``hg.optimize`` with ``hg.Reverse()`` and Adam on λ
  (one training run plus its reverse pass per hyper-step);
- ``es``: the same with ``hg.ES()`` (8 antithetic pairs, σ = 0.1): the gradient of the
  smoothed objective from 17 training runs per hyper-step, nothing differentiated;
- ``online``: ``hg.online`` (RTHO with ``hg.Forward()`` for the few
  hyperparameters, TRHO with ``hg.Truncated(Δ)`` for the many), repeated:
  each pass is one training run during which λ moves every Δ steps, the next
  pass starts from the λ the previous one ended with;
- ``pes``: the same passes with ``hg.PES()`` (8 antithetic particles, σ = 0.1);
- ``hybrid``: TPE over the outer settings of hypergradient descent (the
  hyper learning rate, and where λ starts: one number per entry), each trial
  ten hyper-steps of ``hg.optimize`` from there. The same hybrid as
  ``hypergradient run --trials N --search optuna`` (Ray Tune's
  ``OptunaSearch`` there, Optuna directly here, like ``tpe``).

Two regimes: ``few`` (one learning rate, one momentum, one L2 strength) and
``many`` (a learning rate and a momentum per training step and per layer,
and an L2 strength per layer: 2·T·L + L numbers). All methods search the same
box (the black-box samplers draw from it, the gradient methods are projected
onto it); the gradient and real-time methods start from its centre.

Compilation is excluded from every method's clock: each regime's programs
are compiled once, before any clock starts, and reused by every trial and
hyper-step (the hyper-update of each of the hybrid's few hyper learning rates
too; ``hg.online`` compiles its loop in the first pass and reuses it after;
that compile is subtracted, see ``runners._online_loop_seconds``). Writes to
the Optuna storage are excluded too (they are the machinery of resuming,
which the other methods do not pay).

Outputs in ``--out``: ``trace.csv``, ``summary.csv``, ``summary.md``,
``trace.png``, the Optuna storage (``optuna.journal`` unless ``--storage``)
and ``runs/`` (one JSON per finished gradient run). Running the same command
again resumes: the Optuna studies (random, tpe, hybrid) continue from their
storage (with a larger ``--budget-seconds`` they get the extra time),
finished gradient runs with the same budget are read back, not redone.

The package, by job: ``space`` (λ and its box), ``problem`` (what is tuned),
``programs`` (compiled once per regime), ``clock`` (budgets and runs),
``runners`` (the five methods), ``records`` (finished runs saved),
``report`` (tables and plot), ``run`` (the orchestration), ``cli``.
"""

from .cli import add_arguments as add_arguments
from .cli import main as main
from .problem import EXPERIMENTS as EXPERIMENTS
from .problem import REGIMES as REGIMES
from .problem import Problem as Problem
from .run import compare as compare
from .runners import METHODS as METHODS
from .runners import open_storage as open_storage
from .runners import study_name as study_name
from .space import Axis as Axis
