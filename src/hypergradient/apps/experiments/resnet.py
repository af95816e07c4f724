"""A modern small CNN tuned end to end: a residual network with BatchNorm, dropout, flips and
crops, AdamW with warmup-cosine and gradient clipping.

The network (NHWC, SiLU throughout: relu's jumps break long hypergradients; convolutions as
one product over patches, ``models.conv_same``, which XLA:CPU runs fast inside a scan; see
``docs/sharp_bits.md``)::

    stem:     conv3x3(1 → C), BN, SiLU
    block b:  [avgpool 2x2 if b > 0]  h + conv3x3(SiLU(BN(conv3x3(h)))) then BN, SiLU
    head:     global average pool, dropout, dense(C → classes)

BatchNorm normalizes by the batch's statistics in training and keeps running averages of
them, the model state of ``hg.Dynamics(state=...)``; the validation objective and the test
scores use the running statistics of s_T. Dropout and the augmentation draw from
``key=fold_in(key, t)``. The augmentation mixes each image with a randomly flipped and shifted
copy (a one-pixel crop of the image padded by one),

    x_aug = (1 − m)·x + m·T(x),    m = sigmoid(logit_aug),

so its strength m is a smooth hyperparameter (m = 1: the usual flips + crops).

The optimizer is AdamW with its global-norm gradient clipping, one learning-rate multiplier per
layer group (stem, blocks, head) and a warmup-cosine schedule of the base rate, computed in
``optimizer_hparams``:

    lr_t[g] = lr · warmup_cosine(t) · exp(log_lr_scale[g]),    wd = exp(log_wd)

(decoupled weight decay on the convolution and dense kernels). Tuned by hypergradient
(``hg.optimize``, Reverse with checkpointing by default): the per-group multipliers, the weight
decay and the augmentation strength, on the validation cross-entropy, from the hand-set
defaults, which are also the baseline. ``hypergradient compare resnet`` tunes the same λ by
random search and TPE at equal wall time.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import hypergradient as hg

from .. import models
from . import plots, runner
from .folder import history_columns

NAME = "resnet"
METHODS = ("checkpoint", "reverse")
BN_MOMENTUM = 0.9  # running ← 0.9·running + 0.1·batch
BN_EPS = 1e-3


@dataclasses.dataclass(frozen=True)
class Config(runner.Config):
    """Settings of the resnet experiment (the shared fields: :class:`.runner.Config`).

    Attributes:
      batch_size, steps: training minibatch size and steps T.
      width, blocks: channels C of every convolution and the number of residual blocks.
      lr, warmup, clip: AdamW's peak learning rate, the linear warmup's steps (then a cosine to
        0 at T) and the global gradient norm clipped to.
      wd0, aug0, dropout: the hand-set weight decay and augmentation strength (the baseline and
        where tuning starts) and the dropout rate (fixed).
      lr_scale_bounds, wd_bounds, aug_bounds: the box λ is kept in (its centre is the hand-set
        λ, where ``hypergradient compare resnet`` starts its gradient run).
      flip: whether the augmentation's copy is also flipped at random (else only shifted).
    """

    DEFAULTS = {
        "digits": {"n_train": 800, "n_val": 500, "n_test": None, "batch_size": 50, "steps": 100},
        "paper": {"n_train": 5_000, "n_val": 500, "n_test": 2_000, "batch_size": 32, "steps": 50},
    }

    method: str = "checkpoint"
    hyper_steps: int = 20
    hyper_lr: float = 0.1
    batch_size: int | None = None
    steps: int | None = None
    width: int = 8
    blocks: int = 2
    lr: float = 1e-2
    warmup: int = 10
    clip: float = 1.0
    wd0: float = 0.01
    aug0: float = 0.5
    dropout: float = 0.1
    lr_scale_bounds: tuple[float, float] = (0.05, 20.0)
    wd_bounds: tuple[float, float] = (1e-4, 1.0)
    aug_bounds: tuple[float, float] = (0.01, 0.99)
    flip: bool = True


def tiny(dataset: str = "digits") -> Config:
    """A configuration that runs in seconds (for tests)."""
    return Config(dataset=dataset, hyper_steps=6, hyper_lr=0.2, n_train=200, n_val=200, n_test=300, batch_size=25,
                  steps=40, width=4, blocks=1, lr=3e-2, warmup=5)


# ---------------------------------------------------------------------------------------------
# the network


def groups(blocks: int) -> tuple[str, ...]:
    """The layer groups, each with its own learning-rate multiplier, in λ's order."""
    return ("stem", *(f"block{b}" for b in range(blocks)), "head")


def _conv_init(key, c_in, c_out):
    return jax.random.normal(key, (3, 3, c_in, c_out), jnp.float32) / float(np.sqrt(9 * c_in))


def _bn_init(c):
    return {"scale": jnp.ones(c, jnp.float32), "shift": jnp.zeros(c, jnp.float32)}


def _bn_state(c):
    return {"mean": jnp.zeros(c, jnp.float32), "var": jnp.ones(c, jnp.float32)}


def init(key, width: int, blocks: int, n_classes: int):
    """The weights and the BatchNorm state.

    The weights are ``{group: {layer: ...}}`` (groups: :func:`groups`): convolution kernels
    (``conv``, ``conv1``, ``conv2``), BatchNorm's scale and shift (``bn``, ``bn1``, ``bn2``) and the
    head's ``W`` and ``b``. The state is ``{group: {bn: {mean, var}}}``.
    """
    keys = jax.random.split(key, 2 * blocks + 2)
    params = {"stem": {"conv": _conv_init(keys[0], 1, width), "bn": _bn_init(width)},
              "head": {"W": jax.random.normal(keys[1], (width, n_classes), jnp.float32) / float(np.sqrt(width)),
                       "b": jnp.zeros(n_classes, jnp.float32)}}
    state = {"stem": {"bn": _bn_state(width)}}
    for b in range(blocks):
        params[f"block{b}"] = {"conv1": _conv_init(keys[2 + 2 * b], width, width), "bn1": _bn_init(width),
                               "conv2": _conv_init(keys[3 + 2 * b], width, width), "bn2": _bn_init(width)}
        state[f"block{b}"] = {"bn1": _bn_state(width), "bn2": _bn_state(width)}
    return params, state


def _batch_norm(x, p, s, train: bool):
    """BatchNorm over N, H, W; in training, by the batch's statistics, and the running ones updated."""
    if train:
        mean, var = jnp.mean(x, (0, 1, 2)), jnp.var(x, (0, 1, 2))
        s = {"mean": BN_MOMENTUM * s["mean"] + (1 - BN_MOMENTUM) * mean,
             "var": BN_MOMENTUM * s["var"] + (1 - BN_MOMENTUM) * var}
    else:
        mean, var = s["mean"], s["var"]
    return (x - mean) * jax.lax.rsqrt(var + BN_EPS) * p["scale"] + p["shift"], s


def apply(params, state, x, image_shape, *, train: bool = False, dropout: float = 0.0, key=None):
    """Logits of flattened images ``x`` and the BatchNorm state after them (updated in training)."""
    blocks = len(params) - 2
    h = x.reshape(x.shape[0], *image_shape, 1).astype(params["stem"]["conv"].dtype)  # in the weights' dtype
    new = {}
    stem = params["stem"]
    h, bn = _batch_norm(models.conv_same(h, stem["conv"]), stem["bn"], state["stem"]["bn"], train)
    new["stem"] = {"bn": bn}
    h = jax.nn.silu(h)
    for b in range(blocks):
        p, s = params[f"block{b}"], state[f"block{b}"]
        if b > 0 and h.shape[1] >= 2 and h.shape[2] >= 2:  # average pooling: smooth, unlike max pooling
            n, hh, ww, c = h.shape
            h = h[:, : hh // 2 * 2, : ww // 2 * 2].reshape(n, hh // 2, 2, ww // 2, 2, c).mean(axis=(2, 4))
        r, bn1 = _batch_norm(models.conv_same(h, p["conv1"]), p["bn1"], s["bn1"], train)
        r, bn2 = _batch_norm(models.conv_same(jax.nn.silu(r), p["conv2"]), p["bn2"], s["bn2"], train)
        h = jax.nn.silu(h + r)
        new[f"block{b}"] = {"bn1": bn1, "bn2": bn2}
    h = jnp.mean(h, (1, 2))
    if train and dropout > 0:
        h = h * jax.random.bernoulli(key, 1 - dropout, h.shape) / (1 - dropout)
    return h @ params["head"]["W"] + params["head"]["b"], new


def augment(x, strength, key, image_shape, flip: bool = True):
    """``(1 − strength)·x + strength·T(x)``, T a random one-pixel crop (of the image padded by
    one) and, with ``flip``, a random horizontal flip, drawn per image."""
    n = x.shape[0]
    img = x.reshape(n, *image_shape)
    k_shift, k_flip = jax.random.split(key)
    shifts = jax.random.randint(k_shift, (n, 2), 0, 3)
    padded = jnp.pad(img, ((0, 0), (1, 1), (1, 1)))
    moved = jax.vmap(lambda im, s: jax.lax.dynamic_slice(im, (s[0], s[1]), image_shape))(padded, shifts)
    if flip:
        flipped = jax.random.bernoulli(k_flip, 0.5, (n, 1, 1))
        moved = jnp.where(flipped, moved[:, :, ::-1], moved)
    return ((1 - strength) * img + strength * moved).reshape(n, -1)


def warmup_cosine(t, steps: int, warmup: int):
    """The base rate's factor at step ``t``: linear from 1/warmup to 1, then a cosine to 0 at T."""
    t = jnp.asarray(t, jnp.float32)
    rise = (t + 1) / max(warmup, 1)
    fall = 0.5 * (1 + jnp.cos(jnp.pi * jnp.clip((t - warmup) / max(steps - warmup, 1), 0.0, 1.0)))
    return jnp.where(t < warmup, rise, fall)


def _scale_by_group(group_scale, names):
    """Multiply the updates of group ``names[g]`` by ``group_scale[g]``."""

    def update(updates, state, params=None):
        return {k: jax.tree.map(lambda u: u * group_scale[names.index(k)].astype(u.dtype), v)
                for k, v in updates.items()}, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def adamw(names: tuple[str, ...], clip: float):
    """Global-norm clipping, then AdamW with a learning-rate multiplier per layer group, as an
    ``hg.optim.from_optax`` optimizer with the hyperparameters ``learning_rate``,
    ``weight_decay`` and ``group_scale`` (one entry per group). Decay on the kernels only (the
    weights of two dimensions or more: not BatchNorm's scale and shift, nor the bias)."""

    def kernels(params):
        return jax.tree.map(lambda w: w.ndim >= 2, params)

    def chain(learning_rate, weight_decay, group_scale):
        return optax.chain(optax.clip_by_global_norm(clip), optax.scale_by_adam(),
                           optax.add_decayed_weights(weight_decay, mask=kernels),
                           _scale_by_group(group_scale, names), optax.scale_by_learning_rate(learning_rate))

    return hg.optim.from_optax(chain, learning_rate=1e-3, weight_decay=1e-2,
                               group_scale=jnp.ones(len(names), jnp.float32))


def make_dynamics(config: Config, data) -> Callable[[int], hg.Dynamics]:
    """``seed -> hg.Dynamics``: the training run of ``config`` on ``data`` with the weights,
    minibatch order and keys of ``seed``. The functions are built once, here, so every seed's run
    reuses one compiled program. λ holds ``log_lr_scale`` (one per layer group, or one shared),
    ``log_wd`` and ``logit_aug``."""
    shape, names = data.image_shape, groups(config.blocks)
    T, dropout, flip = config.steps, config.dropout, config.flip

    def loss(w, lam, batch, *, state, key):
        x, y = batch
        k_aug, k_drop = jax.random.split(key)
        x = augment(x, jax.nn.sigmoid(lam["logit_aug"]), k_aug, shape, flip)
        logits, state = apply(w, state, x, shape, train=True, dropout=dropout, key=k_drop)
        return models.cross_entropy(logits, y), state

    def optimizer_hparams(lam, t):
        return {"learning_rate": config.lr * warmup_cosine(t, T, config.warmup),
                "weight_decay": jnp.exp(lam["log_wd"]),
                "group_scale": jnp.broadcast_to(jnp.exp(lam["log_lr_scale"]), (len(names),))}

    optimizer = adamw(names, config.clip)
    examples = (jnp.asarray(data.train.x), jnp.asarray(data.train.y))

    def dynamics(seed: int) -> hg.Dynamics:
        key = jax.random.PRNGKey(seed)
        w0, s0 = init(jax.random.fold_in(key, 0), config.width, config.blocks, data.n_classes)
        return hg.Dynamics(init=w0, loss=loss, optimizer=optimizer, optimizer_hparams=optimizer_hparams,
                           data=hg.Batches(examples, config.batch_size, key=jax.random.fold_in(key, 1)),
                           steps=T, state=s0, key=jax.random.fold_in(key, 2))

    return dynamics


def validation_objective(data):
    """``objective(w, λ, state=s_T)``: the validation cross-entropy with the running statistics,
    a ``Partial`` holding the validation arrays, so that they are arguments of the compiled
    program (as constants, XLA folds the patches of every image at compile time)."""
    loss = functools.partial(_validation_loss, image_shape=data.image_shape)
    return jax.tree_util.Partial(loss, jnp.asarray(data.val.x), jnp.asarray(data.val.y))


def _validation_loss(xv, yv, w, lam, *, state, image_shape):
    return models.cross_entropy(apply(w, state, xv, image_shape)[0], yv)


def final_state(dyn: hg.Dynamics, lam):
    """s_T of training at λ (weights, optimizer state, BatchNorm state), or ``None`` if it diverged."""
    s, losses = hg.dynamics.train(dyn, lam)
    return None if hg.dynamics.first_nonfinite(losses) is not None else s


# ---------------------------------------------------------------------------------------------
# the experiment


class Resnet(runner.Experiment):
    name, methods = NAME, METHODS

    def __init__(self, config: Config, data):
        super().__init__(config, data)
        self.names = groups(config.blocks)
        self.dynamics = make_dynamics(config, data)(config.seed)
        self.objective = validation_objective(data)
        shape = data.image_shape
        logits = jax.jit(lambda s, x: apply(s.params, s.model_state, x, shape)[0])
        self.logits = lambda s, x: logits(s, jnp.asarray(x))
        f32 = jnp.float32
        self.lam0 = {"log_lr_scale": jnp.zeros(len(self.names), f32),
                     "log_wd": jnp.asarray(np.log(config.wd0), f32),
                     "logit_aug": jnp.asarray(np.log(config.aug0 / (1 - config.aug0)), f32)}
        logit = lambda p: float(np.log(p / (1 - p)))  # noqa: E731
        (s_lo, s_hi), (wd_lo, wd_hi), (a_lo, a_hi) = config.lr_scale_bounds, config.wd_bounds, config.aug_bounds
        self.box = hg.constraints.chain(
            hg.constraints.box(float(np.log(s_lo)), float(np.log(s_hi)), on="log_lr_scale"),
            hg.constraints.box(float(np.log(wd_lo)), float(np.log(wd_hi)), on="log_wd"),
            hg.constraints.box(logit(a_lo), logit(a_hi), on="logit_aug"))

    def train(self, hparams):
        """s_T (the scores read the running statistics too), or ``None`` if training diverged."""
        return final_state(self.dynamics, hparams)

    def baseline(self) -> dict:
        """The scores of the network at its hand-set hyperparameters, and the wall time of one run."""
        started = time.perf_counter()
        fixed = self.scores(self.train(self.lam0))
        fixed["seconds"] = time.perf_counter() - started
        c = self.config
        runner.detail(f"hand-set (lr multipliers 1, weight decay {c.wd0:g}, augmentation {c.aug0:g}): "
                      f"test error {fixed['test_error']:.4f}, validation loss {fixed['val_loss']:.4f}")
        return fixed

    def searches(self, baseline) -> list[runner.Search]:
        return [runner.Search("optimize", self.lam0, self.box)]

    def report(self, out_dir, baseline, tuned, scores) -> runner.Report:
        fixed, (t,), (after,) = baseline, tuned, scores
        runner.detail(f"test error {after['test_error']:.4f} (hand-set: {fixed['test_error']:.4f})")
        lam = t.hparams
        traj = t.history.get("hparams", {})
        scale = np.exp(np.asarray(traj.get("log_lr_scale", np.zeros((0, len(self.names)))), np.float64))
        wd = np.exp(np.asarray(traj.get("log_wd", np.zeros(0)), np.float64))
        aug = 1 / (1 + np.exp(-np.asarray(traj.get("logit_aug", np.zeros(0)), np.float64)))
        fields = {
            "training_steps": self.dynamics.steps,
            "hyper_steps": int(len(t.history["value"])),
            "hyperparameters": len(self.names) + 2,
            "groups": list(self.names),
            "lr_scale_end": np.exp(np.asarray(lam["log_lr_scale"], np.float64)).tolist(),
            "wd_start": self.config.wd0,
            "wd_end": float(np.exp(lam["log_wd"])),
            "aug_start": self.config.aug0,
            "aug_end": float(1 / (1 + np.exp(-float(lam["logit_aug"])))),
            "val_loss_hand_set": fixed["val_loss"],
            "val_loss_tuned": after["val_loss"],
            "test_error_hand_set": fixed["test_error"],
            "test_error_tuned": after["test_error"],
            "test_loss_hand_set": fixed["test_loss"],
            "test_loss_tuned": after["test_loss"],
            "seconds_hand_set": fixed["seconds"],
            "seconds_tuning": t.seconds,
            **t.selection(),
            "note": t.note,
        }
        columns = history_columns(t.history, wd=list(wd), aug=list(aug),
                                  **{f"lr_scale_{n}": list(scale[:, g]) for g, n in enumerate(self.names)})
        figure = _plot(out_dir, t, fixed["val_loss"], self.names, scale, wd, aug)
        return runner.Report(fields, [figure], columns)


def run(config: Config, out_dir, progress: bool | None = None) -> dict:
    """Run the experiment; write config.json, history.csv, result.json and plots to ``out_dir``."""
    return runner.run(Resnet, config, out_dir, progress)


def _plot(out_dir: Path, tuned, baseline: float, names, scale, wd, aug) -> str:
    """The validation loss per hyper-step, the per-group multipliers, the weight decay and the augmentation."""
    plt = plots.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    plots.curve(axes[0], tuned, "tuned")
    axes[0].axhline(baseline, color="gray", ls="--", label="hand-set")
    axes[0].set(xlabel="hyper-step", ylabel="validation loss", title="hyper-optimization")
    axes[0].legend(fontsize=7)
    for g, n in enumerate(names):
        axes[1].plot(scale[:, g], label=n)
    axes[1].set(xlabel="hyper-step", ylabel="× base learning rate", yscale="log", title="per-layer learning rate")
    axes[1].legend(fontsize=7)
    axes[2].plot(wd, label="weight decay")
    axes[2].plot(aug, label="augmentation strength")
    axes[2].set(xlabel="hyper-step", yscale="log", title="weight decay and augmentation")
    axes[2].legend(fontsize=7)
    return plots.savefig(fig, out_dir / "resnet.png")
