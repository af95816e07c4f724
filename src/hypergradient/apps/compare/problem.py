"""What a comparison tunes: one :class:`Problem` per regime of an experiment, built once."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

import hypergradient as hg

from .. import datasets, lm, methods, models
from ..experiments import language_model, resnet, schedules
from .programs import Programs
from .space import Axis, Space

REGIMES = ("few", "many")


@dataclasses.dataclass
class Problem:
    """One regime of an experiment, built once; every method and seed reuses its functions.

    Attributes:
      regime: ``"few"`` or ``"many"``.
      space: the hyperparameters λ and their box.
      dynamics: ``seed -> hg.Dynamics``; the functions are shared across
        seeds (only arrays differ), so compiled programs are reused.
      objective: ``(w, λ) -> validation loss`` (``(w, λ, state=s) ->`` for a run with a model state).
      test: ``s_T -> (test loss, test error)``, jitted (s_T the final training state).
      online, online_every: the real-time method's name in :data:`hypergradient.apps.methods.METHODS`
        (``"rtho"`` or ``"trho"``, which truncates at Δ) and Δ.
      hyper_lr: Adam's learning rate on λ for the gradient methods.
    """

    regime: str
    space: Space
    dynamics: Callable[[int], Any]
    objective: Callable
    test: Callable
    online: str
    online_every: int
    hyper_lr: float
    description: str

    @functools.cached_property
    def online_method(self) -> hg.Method:
        """One object per problem, so that every pass of ``hg.online`` hits its cache of compiled loops."""
        return methods.make(self.online, truncation=self.online_every)

    @functools.cached_property
    def programs(self) -> Programs:
        """The regime's compiled programs (one set per problem, so a second comparison reuses them)."""
        return Programs(self)


def schedules_problems(dataset: str, data_dir: str | None, tiny: bool, regimes: Sequence[str]) -> dict[str, Problem]:
    """The ``schedules`` experiment's task (its Config and sizes) with two parametrizations.

    The tanh MLP, data sizes, batch size and T are those of
    ``hypergradient.apps.experiments.schedules`` (``tiny()`` with ``--tiny``);
    momentum SGD in Maclaurin et al.'s form (v ← μv + (1−μ)g, w ← w − ηv)
    with an L2 penalty Σ_l ρ_l ||W_l||² in the training loss.

    - few: η, μ, ρ shared by all steps and layers (3 numbers);
    - many: η[t, l], μ[t, l] per step and layer, ρ[l] per layer (2TL + L).
    """
    config = (schedules.tiny(dataset) if tiny else schedules.Config(dataset=dataset))
    config = dataclasses.replace(config, data_dir=data_dir).resolved()
    data = datasets.load(config.dataset, config.data_dir, n_train=config.n_train, n_val=config.n_val,
                         n_test=config.n_test)
    sizes = (data.train.x.shape[1], *config.hidden, data.n_classes)
    layers, T = len(sizes) - 1, config.steps
    xv, yv = jnp.asarray(data.val.x), jnp.asarray(data.val.y)
    xt, yt = jnp.asarray(data.test.x), jnp.asarray(data.test.y)
    train = (jnp.asarray(data.train.x), jnp.asarray(data.train.y))

    def objective(w, lam):
        return models.cross_entropy(models.mlp_apply(w, xv), yv)

    @jax.jit
    def test(final):
        logits = models.mlp_apply(final.params, xt)
        return models.cross_entropy(logits, yt), models.error_rate(logits, yt)

    lr = lambda shape: Axis("lr", shape, 1e-3, 10.0, "log")  # noqa: E731
    mom = lambda shape: Axis("momentum", shape, 0.0, 0.99, "logit")  # noqa: E731
    l2 = lambda shape: Axis("l2", shape, 1e-6, 1e-1, "log")  # noqa: E731
    every = max(1, T // 10)
    out = {}
    for regime in regimes:
        if regime == "few":
            space = {"log_lr": lr(()), "logit_momentum": mom(()), "log_l2": l2(())}

            def optimizer_hparams(lam, t):
                return {"lr": jnp.exp(lam["log_lr"]), "momentum": jax.nn.sigmoid(lam["logit_momentum"])}

            online = "rtho"
        else:
            space = {"log_lr": lr((T, layers)), "logit_momentum": mom((T, layers)), "log_l2": l2((layers,))}

            def optimizer_hparams(lam, t):
                return {"lr": list(jnp.exp(lam["log_lr"][t])),
                        "momentum": list(jax.nn.sigmoid(lam["logit_momentum"][t]))}

            online = "trho"

        def loss(w, lam, batch):
            x, y = batch
            return models.cross_entropy(models.mlp_apply(w, x), y) + models.l2_penalty(w, jnp.exp(lam["log_l2"]))

        optimizer = hg.optim.momentum(dampen=True)

        def dynamics(seed, loss=loss, optimizer_hparams=optimizer_hparams, optimizer=optimizer):
            key = jax.random.PRNGKey(seed)
            return hg.Dynamics(
                init=models.mlp_init(jax.random.fold_in(key, 0), sizes),  # arrays: one compile for every seed
                loss=loss,
                optimizer=optimizer,
                optimizer_hparams=optimizer_hparams,
                data=hg.Batches(train, config.batch_size, key=jax.random.fold_in(key, 1)),
                steps=T,
            )

        out[regime] = Problem(
            regime=regime, space=space, dynamics=dynamics, objective=objective, test=test,
            online=online, online_every=every, hyper_lr=config.hyper_lr,
            description=(f"tanh MLP {'-'.join(map(str, sizes))}, T={T}, batch {config.batch_size}, "
                         f"{config.n_train}/{config.n_val}/{len(data.test.y)} train/val/test"),
        )
    return out


def resnet_problems(dataset: str, data_dir: str | None, tiny: bool, regimes: Sequence[str]) -> dict[str, Problem]:
    """The ``resnet`` experiment's training run (its Config, sizes, seeds and box) with two parametrizations.

    - few: one learning-rate multiplier for every layer group, the weight decay and the
      augmentation strength (3 numbers);
    - many: a multiplier per layer group (stem, blocks, head), the weight decay and the
      augmentation strength (the λ of ``hypergradient run resnet``).

    The box is the experiment's; its centre is the experiment's hand-set λ (multipliers 1), where
    the gradient methods start.
    """
    config = resnet.tiny(dataset) if tiny else resnet.Config(dataset=dataset)
    config = dataclasses.replace(config, data_dir=data_dir).resolved()
    data = datasets.load(config.dataset, config.data_dir, n_train=config.n_train, n_val=config.n_val,
                         n_test=config.n_test)
    xt, yt, shape = jnp.asarray(data.test.x), jnp.asarray(data.test.y), data.image_shape
    objective = resnet.validation_objective(data)

    @jax.jit
    def scores(final, xt, yt):  # the images as arguments: as constants, XLA would fold their patches
        logits, _ = resnet.apply(final.params, final.model_state, xt, shape)
        return models.cross_entropy(logits, yt), models.error_rate(logits, yt)

    test = functools.partial(scores, xt=xt, yt=yt)

    groups = len(resnet.groups(config.blocks))
    out = {}
    for regime in regimes:
        space = {"log_lr_scale": Axis("lr_scale", () if regime == "few" else (groups,), *config.lr_scale_bounds, "log"),
                 "log_wd": Axis("wd", (), *config.wd_bounds, "log"),
                 "logit_aug": Axis("aug", (), *config.aug_bounds, "logit")}
        out[regime] = Problem(
            regime=regime, space=space, dynamics=resnet.make_dynamics(config, data),
            objective=objective, test=test, online="rtho" if regime == "few" else "trho",
            online_every=max(1, config.steps // 10), hyper_lr=config.hyper_lr,
            description=(f"ResNet width {config.width}, {config.blocks} blocks, BatchNorm, AdamW, T={config.steps}, "
                         f"batch {config.batch_size}, {config.n_train}/{config.n_val}/{len(data.test.y)} "
                         "train/val/test"),
        )
    return out


def lm_problems(dataset: str, data_dir: str | None, tiny: bool, regimes: Sequence[str]) -> dict[str, Problem]:
    """The ``lm`` experiment's training run (its Config, sizes, seeds and box) with two parametrizations.

    - few: AdamW's peak learning rate and weight decay (2 numbers; every window weighs 1);
    - many: those and one weight per source (the λ of ``hypergradient run lm``).

    The box is the experiment's; its centre is the experiment's defaults, where the gradient
    methods start. The test error is the next-byte error of the test windows.
    """
    config = language_model.tiny(dataset) if tiny else language_model.Config(dataset=dataset)
    config = dataclasses.replace(config, data_dir=data_dir).resolved()
    data = language_model.load(config)
    dynamics = lm.make_dynamics((data.train.x, data.train.y), config.steps, config.batch_size, config.d_model,
                                config.heads, config.layers, config.peak, config.weight_decay, config.warmup)
    objective = lm.objective(data.val.x, config.heads)
    test_windows, heads = jnp.asarray(data.test.x), config.heads

    @jax.jit
    def test(final):
        return lm.byte_scores(final.params, test_windows, heads)

    out = {}
    for regime in regimes:
        space = {"log_peak": Axis("peak_lr", (), *config.peak_bounds, "log"),
                 "log_wd": Axis("wd", (), *config.wd_bounds, "log")}
        if regime == "many":
            space["source_logits"] = Axis("source_weight", (len(data.sources),), *config.source_weight_bounds, "log")
        out[regime] = Problem(
            regime=regime, space=space, dynamics=dynamics, objective=objective, test=test,
            online="rtho" if regime == "few" else "trho", online_every=max(1, config.steps // 10),
            hyper_lr=config.hyper_lr,
            description=(f"byte-level transformer d={config.d_model}, {config.layers} layers, {config.heads} heads, "
                         f"context {config.context}, AdamW, T={config.steps}, batch {config.batch_size}, "
                         f"{len(data.train.y)}/{len(data.val.y)}/{len(data.test.y)} train/val/test windows of "
                         f"{', '.join(data.sources)}"),
        )
    return out


#: experiment name -> builder ``(dataset, data_dir, tiny, regimes) -> {regime: Problem}``.
EXPERIMENTS: dict[str, Callable[..., dict[str, Problem]]] = {"schedules": schedules_problems,
                                                            "resnet": resnet_problems, "lm": lm_problems}


@functools.lru_cache(maxsize=4)
def problems(experiment: str, dataset: str, data_dir: str | None, tiny: bool) -> dict[str, Problem]:
    """Both regimes of an experiment, built once per process (a second comparison reuses their compiled programs)."""
    return EXPERIMENTS[experiment](dataset, data_dir, tiny, REGIMES)
