"""The training loop: configuration, data, model, the sharded step, evaluation, metrics (JSON lines),
orbax checkpoints with exact resume, and a plot. The CLI (``flagjax train``) drives it; this module
never prints — progress goes through the ``on_step`` / ``on_eval`` callbacks.

One entry point, :func:`train_and_evaluate`, trains a **batch of runs as one compiled program**: a
config whose batchable fields hold several values (``seed=0,1,2``, ``lr=0.01,0.05``,
``rule_hparams.lam=0,1``) is the product of those values, and the step is ``jax.vmap``-ed over the
runs. Each run keeps its own data split and order, initialisation, keys and evaluation, writes its own
``<out_dir>/<field>_<value>[__...]/metrics.jsonl`` and gives the numbers it gives trained alone (float
tolerance). :func:`run` is the batch of one.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import os
import time
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from flagjax import aggregators, attacks, data, models, parallel

__all__ = [
    "BATCHABLE",
    "Values",
    "batch_axes",
    "expand",
    "train_and_evaluate",
    "enable_compilation_cache",
    "device_memory_limit",
    "vectorized_runs",
    "over_runs",
    "program_bytes",
    "MEMORY_ENV",
    "TrainConfig",
    "ConfigError",
    "apply_overrides",
    "load_config",
    "run",
    "setup",
    "Setup",
    "step_config",
    "worker_shards",
    "RunResult",
    "plot_accuracy",
]


class ConfigError(ValueError):
    """An invalid configuration value (the message names the field and the allowed values)."""


class Values(tuple):
    """Several values of one config field: a batch axis of :func:`train_and_evaluate`.

    ``seed=0,1,2`` on the command line gives ``Values((0, 1, 2))``. In a config file, a list or
    tuple for a scalar field is an axis too (``seed=[0, 1, 2]``); inside ``rule_hparams`` /
    ``attack_hparams`` only ``Values`` is (a plain list there is one value, e.g. an attack's
    ``factors``)."""


# Fields that may take several values in one program (they change no shape or structure). Rule and
# attack hyperparameters may too, as long as the rule/attack uses them as traced numbers (lam, eps,
# tau, an attack's z / eps / factor); a structural one (FA's r, max_iters: the rule record's
# ``static_hparams``) is refused.
BATCHABLE = ("seed", "lr", "momentum", "weight_decay", "lr_decay")
_HPARAM_FIELDS = ("rule_hparams", "attack_hparams")


@dataclasses.dataclass
class TrainConfig:
    """One training run. Every field can be overridden on the command line as ``field=value``.

    Data: ``dataset`` ("fashion_mnist", "mnist", "tfds:<name>"), ``data_dir``, ``shard`` ("iid",
    "dirichlet" with ``dirichlet_alpha``, or ByzFL's gamma-similarity "gamma" with ``gamma_similarity``:
    :func:`flagjax.data.shard_indices`), ``split_among`` ("all": the p workers share the split, the
    default; "honest": the p - f honest workers share it, as ByzFL's clients do, and each Byzantine worker
    draws an iid sample of an honest shard's size from the whole training set, which only data attacks
    use), ``val_fraction`` (held out of the training set for validation; test accuracy is always on the
    test split). Workers: ``num_workers`` p,
    ``num_byzantine`` f (the last f), ``attack`` (gradient attack or data attack "lotka_volterra",
    "noise", "label_flip", "none") with ``attack_hparams`` and ``aug_level`` (LV time t / noise sigma),
    ``worker_momentum`` (an EMA of each worker's gradients, sent instead of the gradient; it replaces
    the server's momentum: set ``momentum=0`` with it — with both at 0.9 and lr 0.05 the paper CNN
    diverges even without attackers), ``drop_prob`` (stragglers: a missing row is treated as Byzantine, sent as
    NaN). Aggregation: ``rule`` (e.g. "flag", "nnm+krum") with ``rule_hparams`` (``center="previous"``
    centres a rule with a ``center`` argument, e.g. centered clipping, on the previous aggregate),
    ``layout`` ("server"/"sharded"), ``num_devices`` (0 = the most devices that divide p), ``worker_grads``
    ("auto", "vmap" or "loop": how a device computes its workers' gradients, the same numbers up to float
    rounding; :class:`flagjax.parallel.StepConfig`).
    Optimisation: ``optimizer`` (any optax name; "sgd" uses ``momentum``), ``lr``, ``weight_decay``,
    step schedule ``lr_decay`` every ``lr_decay_epochs`` epochs (the paper: x0.2 every 10),
    ``batch_size`` per worker, ``steps``.
    Bookkeeping: ``seed``, ``eval_every``, ``eval_examples`` (0 = all), ``log_every``, ``out_dir``,
    ``checkpoint_every`` (0 = only at the end), ``resume``.
    Batches: the fields in :data:`BATCHABLE` and rule/attack hyperparameters may hold several values
    (:class:`Values`); :func:`train_and_evaluate` trains their product as one program, at most
    ``runs_per_program`` runs per program (more runs are trained in chunks of that size; 0 = all in one,
    or, when the device's memory is known, as many as its memory holds: :func:`device_memory_limit`).
    ``runs_vectorized``: how many runs of a program are computed side by side (vmap); groups run one
    after the other in the same program (0 = all; see :func:`vectorized_runs`).
    ``compilation_cache``: a folder for JAX's persistent compilation cache (or set
    ``FLAGJAX_COMPILATION_CACHE``; off when both are empty), so a second process compiles nothing.
    """

    dataset: str = "fashion_mnist"
    data_dir: str = ""
    model: str = "cnn"
    shard: str = "iid"
    dirichlet_alpha: float = 1.0
    gamma_similarity: float = 1.0
    split_among: str = "all"
    val_fraction: float = 0.0
    num_workers: int = 15
    num_byzantine: int = 3
    attack: str = "random"
    attack_hparams: dict = dataclasses.field(default_factory=dict)
    aug_level: float = 0.005
    worker_momentum: float = 0.0
    drop_prob: float = 0.0
    rule: str = "flag"
    rule_hparams: dict = dataclasses.field(default_factory=dict)
    layout: str = "server"
    num_devices: int = 0
    worker_grads: str = "auto"
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_decay: float = 0.2
    lr_decay_epochs: float = 10.0
    batch_size: int = 32
    steps: int = 300
    seed: int = 0
    eval_every: int = 100
    eval_examples: int = 0
    log_every: int = 10
    out_dir: str = "runs/default"
    checkpoint_every: int = 0
    resume: bool = False
    runs_per_program: int = 0
    runs_vectorized: int = 0
    compilation_cache: str = ""

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid field (every run of a batch is checked)."""
        # an unknown or batched rule is reported below (by _validate_one / batch_axes)
        rule = aggregators.parse_spec(self.rule)[0] if isinstance(self.rule, str) else None
        static = aggregators.get(rule).static_hparams if rule in aggregators.names() else ()
        for name, value in self.rule_hparams.items():
            if isinstance(value, Values) and name in static:
                raise ConfigError(
                    f"invalid rule_hparams.{name}={list(value)!r}: must be one value: {name} sets the structure of "
                    f"{rule}'s program (its Rule.static_hparams), so several values are several programs (run "
                    "them separately)"
                )
        for _, run in expand(self):
            run._validate_one()
        if self.runs_per_program < 0:
            raise ConfigError(f"invalid runs_per_program={self.runs_per_program!r}: must be >= 0 (0 = all runs)")
        if self.runs_vectorized < 0:
            raise ConfigError(f"invalid runs_vectorized={self.runs_vectorized!r}: must be >= 0 (0 = all runs)")

    def _validate_one(self) -> None:
        def bad(field, value, allowed):
            raise ConfigError(f"invalid {field}={value!r}: {allowed}")

        if self.num_workers < 1:
            bad("num_workers", self.num_workers, "must be >= 1")
        if not 0 <= self.num_byzantine < self.num_workers:
            bad("num_byzantine", self.num_byzantine, f"must satisfy 0 <= f < num_workers={self.num_workers}")
        if self.model not in models.MODELS:
            bad("model", self.model, f"allowed: {', '.join(sorted(models.MODELS))}")
        if not (self.dataset in ("fashion_mnist", "mnist", "synthetic") or self.dataset.startswith("tfds:")):
            bad("dataset", self.dataset, "allowed: fashion_mnist, mnist, synthetic, tfds:<name>")
        if self.shard not in data.SHARD_SCHEMES:
            bad("shard", self.shard, f"allowed: {', '.join(data.SHARD_SCHEMES)}")
        if self.dirichlet_alpha <= 0:
            bad("dirichlet_alpha", self.dirichlet_alpha, "must be > 0")
        if not 0 <= self.gamma_similarity <= 1:
            bad("gamma_similarity", self.gamma_similarity, "must be in [0, 1]")
        if self.split_among not in ("all", "honest"):
            bad("split_among", self.split_among, "allowed: all, honest")
        if not 0 <= self.val_fraction < 1:
            bad("val_fraction", self.val_fraction, "must be in [0, 1)")
        if self.attack not in attacks.ATTACKS:
            bad("attack", self.attack, f"allowed: {', '.join(attacks.names())}")
        rule, pre = aggregators.parse_spec(self.rule)
        if rule not in aggregators.names():
            bad("rule", self.rule, f"allowed rules: {', '.join(aggregators.names())}")
        for name in pre:
            if name not in aggregators.pre_names():
                bad("rule", self.rule, f"allowed pre-aggregators: {', '.join(aggregators.pre_names())}")
        try:
            aggregators.get(rule).check_f(self.num_byzantine, self.num_workers)
        except ValueError as err:
            bad("num_byzantine", self.num_byzantine, str(err))
        if rule == "flag" and "r" in self.rule_hparams and not 1 <= int(self.rule_hparams["r"]) <= self.num_workers:
            bad(
                "rule_hparams.r",
                self.rule_hparams["r"],
                f"must satisfy 1 <= r <= num_workers={self.num_workers}",
            )
        if rule == "flag" and "warm_start" in self.rule_hparams:
            try:
                aggregators.basic.check_warm_start(self.rule_hparams["warm_start"])
            except ValueError as err:
                bad("rule_hparams.warm_start", self.rule_hparams["warm_start"], str(err))
        try:
            aggregators.check_sketch_hparams(aggregators.get(rule), self.rule_hparams, "rule_hparams")
        except ValueError as err:
            bad("rule_hparams.sketch", self.rule_hparams.get("sketch"), str(err))
        if self.layout not in ("server", "sharded"):
            bad("layout", self.layout, "allowed: server, sharded")
        if self.lr <= 0:
            bad("lr", self.lr, "must be > 0")
        if not 0 <= self.momentum < 1:
            bad("momentum", self.momentum, "must be in [0, 1)")
        if self.weight_decay < 0:
            bad("weight_decay", self.weight_decay, "must be >= 0")
        if not 0 <= self.drop_prob < 1:
            bad("drop_prob", self.drop_prob, "must be in [0, 1)")
        if self.worker_grads not in parallel.WORKER_GRADS:
            bad("worker_grads", self.worker_grads, f"allowed: {', '.join(parallel.WORKER_GRADS)}")
        if not 0 <= self.worker_momentum < 1:
            bad("worker_momentum", self.worker_momentum, "must be in [0, 1)")
        if self.batch_size < 1:
            bad("batch_size", self.batch_size, "must be >= 1")
        if self.steps < 1:
            bad("steps", self.steps, "must be >= 1")
        if not hasattr(optax, self.optimizer):
            bad("optimizer", self.optimizer, "must name an optax optimiser (sgd, adam, adamw, ...)")
        if self.num_devices < 0:
            bad("num_devices", self.num_devices, "must be >= 0 (0 = all devices)")
        for name in ("eval_every", "log_every", "checkpoint_every", "eval_examples"):
            if getattr(self, name) < 0:
                bad(name, getattr(self, name), "must be >= 0")


def _parse_value(field: dataclasses.Field, raw: str):
    hint = typing.get_type_hints(TrainConfig)[field.name]
    if hint is dict:
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as err:
            raise ConfigError(f"invalid {field.name}={raw!r}: expected a JSON object ({err.msg})") from None
        if not isinstance(value, dict):
            raise ConfigError(f"invalid {field.name}={raw!r}: expected a JSON object")
        return value
    if hint is bool:
        low = raw.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"invalid {field.name}={raw!r}: expected true or false")
    try:
        return hint(raw)
    except ValueError:
        raise ConfigError(f"invalid {field.name}={raw!r}: expected {hint.__name__}") from None


def _scalar(raw: str):
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _is_list(raw: str) -> bool:
    """``a,b,c`` outside brackets/braces/quotes: several values (a batch axis)."""
    return "," in raw and raw.strip()[:1] not in "[{\"'"


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply ``field=value`` (and ``rule_hparams.lam=1``-style) overrides; unknown fields raise
    :class:`ConfigError` listing the known ones."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    cfg = dataclasses.replace(cfg, rule_hparams=dict(cfg.rule_hparams), attack_hparams=dict(cfg.attack_hparams))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like field=value")
        key, raw = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if "." in key:
            head, sub = key.split(".", 1)
            if head not in ("rule_hparams", "attack_hparams"):
                raise ConfigError(f"unknown config key {key!r}; only rule_hparams.X and attack_hparams.X nest")
            value = Values(_scalar(v) for v in raw.split(",")) if _is_list(raw) else _scalar(raw)
            getattr(cfg, head)[sub] = value
            continue
        if key not in fields:
            raise ConfigError(f"unknown config key {key!r}; known keys: {', '.join(sorted(fields))}")
        if _is_list(raw) and typing.get_type_hints(TrainConfig)[key] is not dict:
            setattr(cfg, key, Values(_parse_value(fields[key], v.strip()) for v in raw.split(",")))
        else:
            setattr(cfg, key, _parse_value(fields[key], raw))
    return cfg


def batch_axes(cfg: TrainConfig) -> list[tuple[str, tuple]]:
    """The batch axes of ``cfg``: ``[(field, values), ...]`` for every field holding several values
    (``rule_hparams.lam``-style names for hyperparameters), in field order. Raises
    :class:`ConfigError` naming a field that cannot take several values in one program."""
    axes = []
    for f in dataclasses.fields(TrainConfig):
        value = getattr(cfg, f.name)
        if f.name in _HPARAM_FIELDS:
            axes += [(f"{f.name}.{k}", tuple(v)) for k, v in value.items() if isinstance(v, Values)]
        elif isinstance(value, (list, tuple)):
            if f.name not in BATCHABLE:
                raise ConfigError(
                    f"invalid {f.name}={list(value)!r}: only {', '.join(BATCHABLE)}, rule_hparams.X and "
                    f"attack_hparams.X may take several values in one program ({f.name} changes the compiled "
                    f"program; run its values separately)"
                )
            axes.append((f.name, tuple(value)))
    for name, values in axes:
        if not values:
            raise ConfigError(f"invalid {name}=(): a batch axis needs at least one value")
        if len(set(map(repr, values))) != len(values):
            raise ConfigError(f"invalid {name}={list(values)!r}: repeated values (each run needs its own folder)")
    return axes


def _fmt(value) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(value))


def expand(cfg: TrainConfig) -> list[tuple[str, TrainConfig]]:
    """The runs of ``cfg``: ``[(name, single-run config), ...]``, the product of its batch axes in
    order (the last axis fastest). ``name`` is ``"<field>_<value>[__<field>_<value>...]"`` (the run's
    folder under ``out_dir``), ``""`` for a config without axes."""
    axes = batch_axes(cfg)
    runs = []
    for combo in itertools.product(*(values for _, values in axes)):
        run = dataclasses.replace(cfg, rule_hparams=dict(cfg.rule_hparams), attack_hparams=dict(cfg.attack_hparams))
        for (name, _), value in zip(axes, combo, strict=True):
            if "." in name:
                head, sub = name.split(".", 1)
                getattr(run, head)[sub] = value
            else:
                setattr(run, name, value)
        runs.append(("__".join(f"{n}_{_fmt(v)}" for (n, _), v in zip(axes, combo, strict=True)), run))
    return runs


def load_config(path: str | None) -> TrainConfig:
    """``get_config()`` of a Python config file (see ``experiments/configs``), or the defaults."""
    if not path:
        return TrainConfig()
    import importlib.util

    if not os.path.exists(path):
        raise ConfigError(f"invalid config={path!r}: file not found")
    spec = importlib.util.spec_from_file_location("flagjax_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"invalid config={path!r}: it must define get_config() -> TrainConfig")
    cfg = module.get_config()
    if not isinstance(cfg, TrainConfig):
        raise ConfigError(f"invalid config={path!r}: get_config() must return a flagjax.train.TrainConfig")
    return cfg


def _decay_period(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """Steps between learning-rate decays: round(lr_decay_epochs * steps_per_epoch), at least 1."""
    return max(1, int(round(cfg.lr_decay_epochs * steps_per_epoch)))


def opt_hparams(cfg: TrainConfig, steps_per_epoch: int) -> dict:
    """One run's optimiser numbers (float32 scalars; batched over runs by the loop): lr, momentum,
    weight_decay, lr_decay and the decay period in steps (:func:`_decay_period`)."""
    period = _decay_period(cfg, steps_per_epoch)
    return {
        "lr": np.float32(cfg.lr),
        "momentum": np.float32(cfg.momentum),
        "weight_decay": np.float32(cfg.weight_decay),
        "lr_decay": np.float32(cfg.lr_decay),
        "transition_steps": np.float32(period),
    }


def optimizer_factory(optimizer: str, *, momentum: bool) -> Callable[[dict], optax.GradientTransformation]:
    """``make(hp) -> optax.GradientTransformation`` with the numbers of :func:`opt_hparams` possibly
    traced (so one program serves runs with different lr / momentum / weight decay).

    The schedule is optax's staircase ``exponential_decay`` written out (optax's checks ``decay_rate
    == 0`` in Python, which a traced value cannot pass): lr * lr_decay^floor(step / transition_steps).
    ``momentum`` (static) says whether SGD keeps a momentum trace; a run with momentum 0 in a batch
    whose others use momentum gets a trace with decay 0, which is plain SGD.
    """

    def make(hp: dict) -> optax.GradientTransformation:
        def schedule(count):
            lr = hp["lr"]
            decayed = lr * jnp.power(hp["lr_decay"], jnp.floor(count / hp["transition_steps"]))
            return jnp.where(count <= 0, lr, decayed)

        if optimizer == "sgd":
            opt = optax.sgd(schedule, momentum=hp["momentum"] if momentum else None)
        else:
            opt = getattr(optax, optimizer)(schedule)
        return optax.chain(optax.add_decayed_weights(hp["weight_decay"]), opt)

    return make


@dataclasses.dataclass
class RunResult:
    """One run of :func:`train_and_evaluate`: its config, final metrics, history, metrics file, its
    slice of the final state (host arrays) and the layout used."""

    config: TrainConfig
    final: dict
    history: list[dict]
    metrics_path: Path
    state: Any
    layout: str
    layout_note: str
    params: Any = None
    name: str = ""
    runs_in_program: int = 1


def _split_validation(n: int, fraction: float, seed: int):
    """(train indices or None for all, validation indices or None) into the training set."""
    if fraction <= 0:
        return None, None
    rng = np.random.default_rng([seed, 7])
    perm = rng.permutation(n)
    n_val = int(round(fraction * len(perm)))
    return perm[n_val:], perm[:n_val]


def vectorized_runs(setting: int, runs: int) -> int:
    """How many runs of a program are computed side by side (``jax.vmap``); groups of that many run
    one after the other inside the same program (``lax.map``), which bounds the program's memory.
    ``setting`` is the config field ``runs_vectorized``: N > 0 as given (capped at ``runs``), 0 = all.
    On this project's 2-core CPU neither pays: a paper-CNN step (p = 15, batch 32) took 85 ms for one
    run, 276 ms for two vmapped and 420 ms for two one after the other in one program
    (benchmarks/results/batch_step.md); batches are for accelerators, where one wide step fills the device."""
    return min(setting, runs) if setting > 0 else runs


def over_runs(fn: Callable, group: int, runs: int) -> Callable:
    """``fn`` (one run's arguments -> outputs) applied over a leading run axis of every argument:
    ``jax.vmap`` when all ``runs`` form one group, else ``lax.map`` over groups of ``group`` runs (one
    run at a time for ``group == 1``, without any vmap)."""
    if group >= runs:
        return jax.vmap(fn)
    if group == 1:
        return lambda *args: lax.map(lambda a: fn(*a), args)
    return lambda *args: lax.map(lambda a: fn(*a), args, batch_size=group)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _eval_batch(model, variables, xb, yb, group):
    """(B,) summed losses and (B,) numbers correct of one evaluation batch for B stacked models (``group``
    at a time, :func:`over_runs`); compiled once per model, number of models and batch shape."""
    runs = jax.tree_util.tree_leaves(variables)[0].shape[0]

    def one(v):
        logits = model.apply(v, xb, train=False)
        loss = jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, yb))
        return loss, jnp.sum(jnp.argmax(logits, -1) == yb)

    return over_runs(one, group, runs)(variables)


def evaluate(
    model, params, stats, x, y, *, limit: int = 0, batch: int = 2000, group: int = 0
) -> list[tuple[float, float]]:
    """[(mean loss, accuracy)] of each of B stacked models (params/stats with a leading run axis) on
    (x, y), the first ``limit`` examples (0 = all), in batches of ``batch``; ``group`` runs side by side
    (:func:`vectorized_runs`; 0 = all)."""
    if limit:
        x, y = x[:limit], y[:limit]
    has_bn = bool(jax.tree_util.tree_leaves(stats))
    variables = {"params": params, **({"batch_stats": stats} if has_bn else {})}
    runs = jax.tree_util.tree_leaves(params)[0].shape[0]
    tot_loss, tot_acc = np.zeros(runs), np.zeros(runs, np.int64)
    group = vectorized_runs(group, runs)
    for i in range(0, len(y), batch):
        lo, ac = _eval_batch(model, variables, x[i : i + batch], y[i : i + batch], group)
        tot_loss += np.asarray(lo, np.float64)
        tot_acc += np.asarray(ac, np.int64)
    return [(float(lo / len(y)), float(ac / len(y))) for lo, ac in zip(tot_loss, tot_acc, strict=True)]


_RUNS_BY_WORKERS = P(None, parallel.AXIS)


def _global_array(mesh, arr: np.ndarray, spec=_RUNS_BY_WORKERS) -> jax.Array:
    sharding = NamedSharding(mesh, spec)
    return jax.make_array_from_callback(arr.shape, sharding, lambda idx: arr[idx])


def _checkpoint_manager(path: Path):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(path.absolute(), options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))


def step_config(cfg: TrainConfig, num_classes: int, image_hw: tuple[int, int]) -> parallel.StepConfig:
    """The static :class:`flagjax.parallel.StepConfig` of ``cfg`` (LV gather map built here).
    Batched hyperparameters are left out: they reach the step traced."""
    lv_map = None
    if cfg.attack == "lotka_volterra":
        lv_map = data.lotka_volterra_map(image_hw[0], image_hw[1], cfg.aug_level)

    def static(hp: dict):
        return tuple(sorted((k, v) for k, v in hp.items() if not isinstance(v, Values)))

    return parallel.StepConfig(
        num_workers=cfg.num_workers,
        num_byzantine=cfg.num_byzantine,
        rule=cfg.rule,
        rule_hparams=static(cfg.rule_hparams),
        attack=cfg.attack,
        attack_hparams=static(cfg.attack_hparams),
        aug_level=cfg.aug_level,
        worker_momentum=cfg.worker_momentum,
        layout=cfg.layout,
        lv_map=lv_map,
        num_classes=num_classes,
        drop_prob=cfg.drop_prob,
        worker_grads=cfg.worker_grads,
    )


@dataclasses.dataclass
class RunData:
    """One run's view of the data: its per-worker sampler (indices into the full training set), its
    validation split and steps per epoch."""

    sampler: data.WorkerSampler
    val_x: np.ndarray | None
    val_y: np.ndarray | None
    steps_per_epoch: int


def worker_shards(cfg: TrainConfig, labels: np.ndarray) -> list[np.ndarray]:
    """The p workers' example indices into ``labels`` (the training labels after the validation split),
    as ``cfg.shard`` and ``cfg.split_among`` set them (see :class:`TrainConfig`): a list of p sorted int
    arrays, the Byzantine workers last. Deterministic in ``cfg.seed``."""
    honest_only = cfg.split_among == "honest" and cfg.num_byzantine > 0
    n_split = cfg.num_workers - cfg.num_byzantine if honest_only else cfg.num_workers
    kw = dict(scheme=cfg.shard, alpha=cfg.dirichlet_alpha, gamma=cfg.gamma_similarity, seed=cfg.seed)
    shards = data.shard_indices(labels, n_split, **kw)
    if honest_only:  # the last f workers are Byzantine: iid draws of an honest shard's size
        rng = np.random.default_rng([cfg.seed, 0xB7])
        size = int(np.mean([len(s) for s in shards]))
        shards += [np.sort(rng.choice(len(labels), size, replace=False)) for _ in range(cfg.num_byzantine)]
    return shards


def _run_data(cfg: TrainConfig, ds: data.Dataset) -> RunData:
    tr, val = _split_validation(len(ds.train_y), cfg.val_fraction, cfg.seed)
    labels = ds.train_y if tr is None else ds.train_y[tr]
    shards = worker_shards(cfg, labels)
    if tr is not None:
        shards = [tr[s] for s in shards]
    sampler = data.WorkerSampler(shards, cfg.batch_size, seed=cfg.seed)
    spe = max(1, min(len(s) for s in shards) // cfg.batch_size)
    if val is None:
        return RunData(sampler, None, None, spe)
    return RunData(sampler, ds.train_x[val], ds.train_y[val], spe)


def _traced_hparams(cfg: TrainConfig, run: TrainConfig) -> dict:
    """The run's values of the batched rule/attack hyperparameters (as arrays, vmapped over runs)."""
    out = {}
    for field, part in (("rule_hparams", "rule"), ("attack_hparams", "attack")):
        batched = [k for k, v in getattr(cfg, field).items() if isinstance(v, Values)]
        out[part] = {k: np.asarray(getattr(run, field)[k]) for k in batched}
    return out


def _stack(trees: list) -> Any:
    return jax.tree.map(lambda *a: np.stack([np.asarray(jax.device_get(v)) for v in a]), *trees)


@dataclasses.dataclass
class Setup:
    """Everything the loop builds before its first step for a batch of B runs (also used by
    benchmarks/train_step.py). ``state`` and ``hparams`` carry a leading run axis."""

    runs: list[tuple[str, TrainConfig]]
    dataset: data.Dataset
    model: Any
    mesh: Any
    step_fn: Callable
    layout: str
    layout_note: str
    state: parallel.TrainState
    hparams: dict
    run_data: list[RunData]
    step_config: parallel.StepConfig

    def batch(self, step: int) -> tuple[jax.Array, jax.Array]:
        """The (B, p, batch, ...) inputs and (B, p, batch) labels of ``step``, sharded along workers."""
        idx = np.stack([rd.sampler.indices(step) for rd in self.run_data])
        ds = self.dataset
        return _global_array(self.mesh, ds.train_x[idx]), _global_array(self.mesh, ds.train_y[idx])

    def step(self, state, x, y):
        """One step of every run: ``step_fn(state, x, y, hparams)``."""
        return self.step_fn(state, x, y, self.hparams)


def setup(cfg: TrainConfig, dataset: data.Dataset | None = None, *, runs=None) -> Setup:
    """Validate ``cfg``; load data; build the model, mesh, the vmapped step and the stacked initial
    state of the runs of ``cfg`` (all of :func:`expand`, or the given sublist ``runs``)."""
    cfg.validate()
    runs = expand(cfg) if runs is None else list(runs)
    ds = dataset or data.load_dataset(cfg.dataset, cfg.data_dir or None)
    run_data = [_run_data(run, ds) for _, run in runs]
    model = models.make_model(cfg.model, ds.num_classes)
    n_dev = cfg.num_devices or max(d for d in range(1, jax.device_count() + 1) if cfg.num_workers % d == 0)
    mesh = parallel.make_mesh(n_dev)
    scfg = step_config(cfg, ds.num_classes, ds.train_x.shape[1:3])
    make_tx = optimizer_factory(cfg.optimizer, momentum=any(run.momentum > 0 for _, run in runs))

    states, hps = [], []
    for (_, run), rd in zip(runs, run_data, strict=True):
        variables = model.init(jax.random.key(run.seed), jnp.zeros((1, *ds.train_x.shape[1:]), jnp.float32))
        params = variables["params"]
        opt = opt_hparams(run, rd.steps_per_epoch)
        states.append(
            parallel.TrainState(
                step=np.int32(0),
                params=params,
                batch_stats=variables.get("batch_stats", {}),
                opt_state=make_tx(opt).init(params),
                worker_mom=parallel.init_worker_momentum(scfg, params),  # host zeros, placed below
                key=jax.random.key_data(jax.random.key(run.seed + 1)),
                rule_state=parallel.init_rule_state(scfg, params),
            )
        )
        hps.append({"opt": opt, **_traced_hparams(cfg, run)})
    raw_step, layout, note = parallel.build_step(model, make_tx, scfg, mesh, states[0].params, jit=False)
    group = vectorized_runs(cfg.runs_vectorized, len(runs))
    step_fn = jax.jit(over_runs(raw_step, group, len(runs)), donate_argnums=(0,))
    state = _stack(states)
    hparams = _stack(hps)
    if n_dev > 1:  # per-worker momentum sharded along workers, everything else replicated
        mom = _global_array(mesh, state.worker_mom, P(None, parallel.AXIS))
        state = jax.tree.map(lambda a: _global_array(mesh, a, P()), state._replace(worker_mom=None))
        state = state._replace(worker_mom=mom)
        hparams = jax.tree.map(lambda a: _global_array(mesh, a, P()), hparams)
    return Setup(runs, ds, model, mesh, step_fn, layout, note, state, hparams, run_data, scfg)


def _cache_dir(cfg: TrainConfig) -> str:
    return cfg.compilation_cache or os.environ.get("FLAGJAX_COMPILATION_CACHE", "")


def enable_compilation_cache(path: str | os.PathLike) -> None:
    """Turn on JAX's persistent compilation cache in ``path`` for this process (every program, however
    fast it compiled), so a later process with the same programs loads them instead of compiling.
    Opt-in: the config field ``compilation_cache`` or the environment variable
    ``FLAGJAX_COMPILATION_CACHE`` (docs/design.md, "Compile once")."""
    Path(path).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def _fetch(tree):
    """Host copies of a pytree of arrays; in a multi-process run an array sharded over devices of other
    processes (the per-worker momentum) is gathered from every process first."""
    from jax.experimental import multihost_utils

    def one(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable and not a.is_fully_replicated:
            return np.asarray(multihost_utils.process_allgather(a, tiled=True))
        return jax.device_get(a)

    return jax.tree.map(one, tree)


def _is_trace_error(err: Exception) -> bool:
    return isinstance(
        err,
        (
            jax.errors.ConcretizationTypeError,
            jax.errors.TracerBoolConversionError,
            jax.errors.TracerIntegerConversionError,
            jax.errors.TracerArrayConversionError,
        ),
    )


def train_and_evaluate(
    config: TrainConfig,
    workdir: str | os.PathLike | None = None,
    *,
    on_step: Callable[[int, dict], None] | None = None,
    on_eval: Callable[[int, dict], None] | None = None,
    dataset: data.Dataset | None = None,
) -> list[RunResult]:
    """Train every run of ``config`` (:func:`expand`) as one compiled program per chunk of
    ``runs_per_program`` runs; return one :class:`RunResult` per run, in :func:`expand`'s order.

    Args:
      config: the :class:`TrainConfig`; batch axes as :class:`Values` (see :data:`BATCHABLE`).
      workdir: output folder (default ``config.out_dir``). A run named ``name`` writes
        ``workdir/name/metrics.jsonl`` (``workdir/metrics.jsonl`` for a config without axes);
        checkpoints of the stacked state go to ``workdir/checkpoints`` (``checkpoints/chunk_K`` when
        the runs are split into chunks).
      on_step, on_eval: callbacks ``(step, record)`` with the first run of the chunk's record.
      dataset: overrides loading (tests pass small synthetic sets).

    Metrics lines: ``step``, ``loss`` (mean over honest workers), ``train_accuracy``, ``wall_time``
    (s since the chunk's start), ``step_time`` (s; the whole batch's step), ``agg_norm``, ``lr``, for
    FA ``ratios`` (p,), ``mean_ratios`` and ``status``; evaluation lines add ``test_accuracy``,
    ``test_loss`` (and ``val_accuracy`` / ``val_loss`` with a validation split).
    """
    config.validate()
    if workdir is not None:
        config = dataclasses.replace(config, out_dir=str(workdir))
    cache = _cache_dir(config)
    if cache:
        enable_compilation_cache(cache)
    runs = expand(config)
    dataset = dataset or data.load_dataset(config.dataset, config.data_dir or None)
    size, measured = (
        (config.runs_per_program, None) if config.runs_per_program else _runs_that_fit(config, runs, dataset)
    )
    chunks = [runs[i : i + size] for i in range(0, len(runs), size)]
    results: list[RunResult] = []
    for k, chunk in enumerate(chunks):
        ckpt_dir = Path(config.out_dir) / "checkpoints" / (f"chunk_{k}" if len(chunks) > 1 else "")
        su = measured if len(chunks) == 1 else None  # the memory check's setup, already compiled
        results += _train_chunk(config, chunk, ckpt_dir, on_step, on_eval, dataset, su)
    return results


MEMORY_ENV = "FLAGJAX_DEVICE_MEMORY_BYTES"


def device_memory_limit() -> int | None:
    """Bytes one device may use: ``FLAGJAX_DEVICE_MEMORY_BYTES`` if set (e.g. to share a GPU), else the
    device's ``memory_stats()["bytes_limit"]`` (GPU/TPU); ``None`` when unknown (CPU)."""
    if os.environ.get(MEMORY_ENV):
        return int(float(os.environ[MEMORY_ENV]))
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


def program_bytes(config: TrainConfig, dataset: data.Dataset | None = None, *, runs=None) -> int:
    """Device bytes of one training step's compiled program for the runs of ``config`` (all, or the
    sublist ``runs``), from XLA's memory analysis: arguments + outputs + temporaries - donated
    (aliased) buffers, per device."""
    return _program_bytes(setup(config, dataset, runs=runs))


def _program_bytes(su: Setup) -> int:
    """:func:`program_bytes` of a built :class:`Setup` (compiling its step; a later call of
    ``su.step`` reuses that compilation)."""
    x, y = su.batch(0)
    ma = su.step_fn.lower(su.state, x, y, su.hparams).compile().memory_analysis()
    return int(ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes - ma.alias_size_in_bytes)


def _runs_that_fit(config: TrainConfig, runs: list, dataset: data.Dataset) -> tuple[int, Setup | None]:
    """``runs_per_program=0``: all runs in one program, unless the device's memory is known and the
    program for all of them needs more than 90% of it; then as many as fit (by the per-run share of
    the measured program), or a :class:`ConfigError` when not even one run fits. Returns (runs per
    program, the measured :class:`Setup` when it is the one to train, else None): when all runs fit,
    training reuses the setup and the compilation of the check, so the check costs nothing more."""
    limit = device_memory_limit()
    if not limit or len(runs) == 1:  # one run that does not fit fails in XLA with its own message
        return len(runs), None
    su = setup(config, dataset, runs=runs)
    need = _program_bytes(su)
    budget = 0.9 * limit
    if need <= budget:
        return len(runs), su
    per_run = need / len(runs)
    fit = int(budget // per_run)
    if fit < 1:
        raise ConfigError(
            f"invalid batch_size={config.batch_size}: one run's training step needs {per_run / 1e9:.2f} GB, more "
            f"than 90% of the device's {limit / 1e9:.2f} GB (reduce batch_size or the model, or set {MEMORY_ENV})"
        )
    return fit, None


def _train_chunk(cfg, chunk, ckpt_dir, on_step, on_eval, dataset, su=None) -> list[RunResult]:
    su = su or setup(cfg, dataset, runs=chunk)
    model, state, ds = su.model, su.state, su.dataset
    out = Path(cfg.out_dir)
    is_main = jax.process_index() == 0
    paths = [out / name if name else out for name, _ in su.runs]
    if is_main:
        for path in paths:
            path.mkdir(parents=True, exist_ok=True)
    ckpt = _checkpoint_manager(ckpt_dir) if (cfg.checkpoint_every or cfg.resume) else None
    histories: list[list[dict]] = [[] for _ in su.runs]
    start_step = 0
    if cfg.resume and ckpt is not None and ckpt.latest_step() is not None:
        import orbax.checkpoint as ocp

        rep = NamedSharding(su.mesh, P())  # one-device runs keep host arrays (uncommitted) until the first step
        abstract = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", rep)), state
        )
        state = ckpt.restore(ckpt.latest_step(), args=ocp.args.StandardRestore(abstract))
        start_step = int(np.asarray(_fetch(state.step))[0])
        for i, path in enumerate(paths):
            mp = path / "metrics.jsonl"
            if mp.exists():
                hist = [json.loads(line) for line in mp.read_text().splitlines() if line.strip()]
                histories[i] = [h for h in hist if h["step"] <= start_step]
    f_eff = cfg.num_byzantine if cfg.attack != "none" else 0
    honest = cfg.num_workers - f_eff

    def write_histories():
        if is_main:
            for path, hist in zip(paths, histories, strict=True):
                tmp = path / "metrics.tmp"
                tmp.write_text("".join(json.dumps(h) + "\n" for h in hist))
                os.replace(tmp, path / "metrics.jsonl")

    axes = [name for name, _ in batch_axes(cfg) if "." in name]
    t0 = time.perf_counter()
    for step in range(start_step, cfg.steps):
        x, y = su.batch(step)
        ts = time.perf_counter()
        try:
            state, m = su.step(state, x, y)
        except Exception as err:
            if axes and (_is_trace_error(err) or "Tracer" in str(err)):
                raise ConfigError(
                    f"invalid {', '.join(axes)}: a hyperparameter in this list shapes the compiled program "
                    f"(it is used as a Python value), so it cannot take several values in one batch; run its "
                    f"values separately ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
                ) from None
            raise
        m = jax.device_get(m)  # blocks: on CPU this also avoids the many-device rendezvous deadlock
        step_time = time.perf_counter() - ts
        done = step + 1
        log = done % max(cfg.log_every, 1) == 0 or done == cfg.steps
        evals = (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps
        recs = None
        if log or evals:
            recs = []
            for i, (_, run) in enumerate(su.runs):
                period = _decay_period(run, su.run_data[i].steps_per_epoch)
                rec = {
                    "step": done,
                    "loss": float(np.mean(m["loss"][i][:honest])),
                    "train_accuracy": float(np.mean(m["accuracy"][i][:honest])),
                    "wall_time": time.perf_counter() - t0,
                    "step_time": step_time,
                    "agg_norm": float(m["agg_norm"][i]),
                    "lr": float(run.lr * run.lr_decay ** (step // period)),
                }
                if "ratios" in m:
                    rec["ratios"] = [round(float(v), 6) for v in m["ratios"][i]]
                    rec["status"] = int(m["status"][i])
                if "mean_ratios" in m:
                    rec["mean_ratios"] = [round(float(v), 6) for v in m["mean_ratios"][i]]
                recs.append(rec)
            if evals:
                params_h, stats_h = _fetch((state.params, state.batch_stats))
                test = evaluate(
                    model, params_h, stats_h, ds.test_x, ds.test_y, limit=cfg.eval_examples, group=cfg.runs_vectorized
                )
                for i, rec in enumerate(recs):
                    rec["test_loss"], rec["test_accuracy"] = test[i]
                    rd = su.run_data[i]
                    if rd.val_x is not None:
                        one = jax.tree.map(lambda a, i=i: a[i : i + 1], (params_h, stats_h))
                        rec["val_loss"], rec["val_accuracy"] = evaluate(model, *one, rd.val_x, rd.val_y)[0]
                if on_eval:
                    on_eval(done, recs[0])
            for hist, rec in zip(histories, recs, strict=True):
                hist.append(rec)
        if on_step:
            on_step(done, recs[0] if recs else {"step": done, "loss": float(np.mean(m["loss"][0][:honest]))})
        if ckpt is not None and cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
            import orbax.checkpoint as ocp

            write_histories()
            ckpt.save(done, args=ocp.args.StandardSave(state))
            ckpt.wait_until_finished()
    write_histories()
    if ckpt is not None:
        import orbax.checkpoint as ocp

        ckpt.save(cfg.steps, args=ocp.args.StandardSave(state), force=True)
        ckpt.wait_until_finished()
        ckpt.close()
    host = _fetch(state)
    results = []
    for i, (name, run) in enumerate(su.runs):
        one = jax.tree.map(lambda a, i=i: a[i], host)
        hist = histories[i]
        results.append(
            RunResult(
                run,
                hist[-1] if hist else {},
                hist,
                paths[i] / "metrics.jsonl",
                one,
                su.layout,
                su.layout_note,
                one.params,
                name,
                len(su.runs),
            )
        )
    return results


def run(
    cfg: TrainConfig,
    *,
    on_step: Callable[[int, dict], None] | None = None,
    on_eval: Callable[[int, dict], None] | None = None,
    dataset: data.Dataset | None = None,
) -> RunResult:
    """Train the single run ``cfg`` (no batch axes): :func:`train_and_evaluate` with a batch of one;
    writes ``out_dir/metrics.jsonl`` (and checkpoints) and returns its :class:`RunResult`."""
    axes = batch_axes(cfg)
    if axes:
        names = ", ".join(n for n, _ in axes)
        raise ConfigError(f"run() trains one run; {names} hold several values: use train_and_evaluate")
    return train_and_evaluate(cfg, on_step=on_step, on_eval=on_eval, dataset=dataset)[0]


def plot_accuracy(results: dict[str, list[dict]], path: str | os.PathLike, title: str = "") -> Path:
    """Test accuracy vs step for several runs (label -> metrics history); writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, hist in results.items():
        pts = [(h["step"], h["test_accuracy"]) for h in hist if "test_accuracy" in h]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def epochs_to_steps(cfg: TrainConfig, num_train: int, epochs: float) -> int:
    """Steps for ``epochs`` passes over the per-worker shards (p workers x batch_size per step)."""
    return max(1, math.ceil(epochs * num_train / (cfg.num_workers * cfg.batch_size)))
