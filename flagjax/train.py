"""The training loop: configuration, data, model, the sharded step, evaluation, metrics (JSON lines),
orbax checkpoints with exact resume, and a plot. The CLI (``flagjax train``) drives it; this module
never prints — progress goes through the ``on_step`` / ``on_eval`` callbacks.
"""

from __future__ import annotations

import dataclasses
import functools
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
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from flagjax import data, models, parallel

__all__ = [
    "TrainConfig",
    "ConfigError",
    "apply_overrides",
    "load_config",
    "make_optimizer",
    "run",
    "setup",
    "Setup",
    "step_config",
    "RunResult",
    "plot_accuracy",
]


class ConfigError(ValueError):
    """An invalid configuration value (the message names the field and the allowed values)."""


@dataclasses.dataclass
class TrainConfig:
    """One training run. Every field can be overridden on the command line as ``field=value``.

    Data: ``dataset`` ("fashion_mnist", "mnist", "tfds:<name>"), ``data_dir``, ``shard`` ("iid" or
    "dirichlet") with ``dirichlet_alpha``, ``val_fraction`` (held out of the training set for
    validation; test accuracy is always on the test split). Workers: ``num_workers`` p,
    ``num_byzantine`` f (the last f), ``attack`` (gradient attack or data attack "lotka_volterra",
    "noise", "label_flip", "none") with ``attack_hparams`` and ``aug_level`` (LV time t / noise sigma),
    ``worker_momentum`` (an EMA of each worker's gradients, sent instead of the gradient; it replaces
    the server's momentum: set ``momentum=0`` with it — with both at 0.9 and lr 0.05 the paper CNN
    diverges even without attackers), ``drop_prob`` (stragglers: a missing row is treated as Byzantine, sent as
    NaN). Aggregation: ``rule`` (e.g. "flag", "nnm+krum") with ``rule_hparams`` (``center="previous"``
    centres a rule with a ``center`` argument, e.g. centered clipping, on the previous aggregate),
    ``layout`` ("server"/"sharded"), ``num_devices`` (0 = the most devices that divide p).
    Optimisation: ``optimizer`` (any optax name; "sgd" uses ``momentum``), ``lr``, ``weight_decay``,
    step schedule ``lr_decay`` every ``lr_decay_epochs`` epochs (the paper: x0.2 every 10),
    ``batch_size`` per worker, ``steps``.
    Bookkeeping: ``seed``, ``eval_every``, ``eval_examples`` (0 = all), ``log_every``, ``out_dir``,
    ``checkpoint_every`` (0 = only at the end), ``resume``.
    """

    dataset: str = "fashion_mnist"
    data_dir: str = ""
    model: str = "cnn"
    shard: str = "iid"
    dirichlet_alpha: float = 1.0
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

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid field."""
        from flagjax import aggregators, attacks

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
        if self.shard not in ("iid", "dirichlet"):
            bad("shard", self.shard, "allowed: iid, dirichlet")
        if self.dirichlet_alpha <= 0:
            bad("dirichlet_alpha", self.dirichlet_alpha, "must be > 0")
        if not 0 <= self.val_fraction < 1:
            bad("val_fraction", self.val_fraction, "must be in [0, 1)")
        if self.attack not in parallel.DATA_ATTACKS and self.attack not in attacks.names():
            allowed = ", ".join(sorted((*parallel.DATA_ATTACKS, *attacks.names())))
            bad("attack", self.attack, f"allowed: {allowed}")
        rule, pre = aggregators.parse_spec(self.rule)
        if rule not in aggregators.names():
            bad("rule", self.rule, f"allowed rules: {', '.join(aggregators.names())}")
        for name in pre:
            if name not in aggregators.pre_names():
                bad("rule", self.rule, f"allowed pre-aggregators: {', '.join(aggregators.pre_names())}")
        r = aggregators.get(rule)
        if self.num_byzantine > r.max_f(self.num_workers):
            bad(
                "num_byzantine",
                self.num_byzantine,
                f"rule {rule!r} with num_workers={self.num_workers} requires {r.requirement}",
            )
        if rule == "flag" and "r" in self.rule_hparams and not 1 <= int(self.rule_hparams["r"]) <= self.num_workers:
            bad(
                "rule_hparams.r",
                self.rule_hparams["r"],
                f"must satisfy 1 <= r <= num_workers={self.num_workers}",
            )
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
            getattr(cfg, head)[sub] = _scalar(raw)
            continue
        if key not in fields:
            raise ConfigError(f"unknown config key {key!r}; known keys: {', '.join(sorted(fields))}")
        setattr(cfg, key, _parse_value(fields[key], raw))
    return cfg


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


def make_optimizer(cfg: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    """Weight decay + the named optax optimiser on a step schedule (x lr_decay every lr_decay_epochs)."""
    sched = optax.exponential_decay(
        cfg.lr,
        transition_steps=max(1, int(round(cfg.lr_decay_epochs * steps_per_epoch))),
        decay_rate=cfg.lr_decay,
        staircase=True,
    )
    if cfg.optimizer == "sgd":
        opt = optax.sgd(sched, momentum=cfg.momentum or None)
    else:
        opt = getattr(optax, cfg.optimizer)(sched)
    return optax.chain(optax.add_decayed_weights(cfg.weight_decay), opt)


@dataclasses.dataclass
class RunResult:
    """What :func:`run` returns: final metrics, the metrics file, the final state and the layout used."""

    config: TrainConfig
    final: dict
    history: list[dict]
    metrics_path: Path
    state: Any
    layout: str
    layout_note: str
    params: Any = None


def _split_validation(ds: data.Dataset, fraction: float, seed: int):
    if fraction <= 0:
        return ds.train_x, ds.train_y, None, None
    rng = np.random.default_rng([seed, 7])
    perm = rng.permutation(len(ds.train_y))
    n_val = int(round(fraction * len(perm)))
    val, tr = perm[:n_val], perm[n_val:]
    return ds.train_x[tr], ds.train_y[tr], ds.train_x[val], ds.train_y[val]


@functools.partial(jax.jit, static_argnums=0)
def _eval_batch(model, variables, xb, yb):
    """(summed loss, number correct) of one evaluation batch; compiled once per model and batch shape."""
    logits = model.apply(variables, xb, train=False)
    return (
        jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, yb)),
        jnp.sum(jnp.argmax(logits, -1) == yb),
    )


def _evaluate(model, params, stats, x, y, limit: int, batch: int = 2000) -> tuple[float, float]:
    if limit:
        x, y = x[:limit], y[:limit]
    has_bn = bool(jax.tree_util.tree_leaves(stats))
    variables = {"params": params, **({"batch_stats": stats} if has_bn else {})}
    tot_loss, tot_acc = 0.0, 0
    for i in range(0, len(y), batch):
        lo, ac = _eval_batch(model, variables, x[i : i + batch], y[i : i + batch])
        tot_loss += float(lo)
        tot_acc += int(ac)
    return tot_loss / len(y), tot_acc / len(y)


def _global_array(mesh, arr: np.ndarray) -> jax.Array:
    sharding = NamedSharding(mesh, P(parallel.AXIS))
    return jax.make_array_from_callback(arr.shape, sharding, lambda idx: arr[idx])


def _checkpoint_manager(path: Path):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(path.absolute(), options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))


def step_config(cfg: TrainConfig, num_classes: int, image_hw: tuple[int, int]) -> parallel.StepConfig:
    """The static :class:`flagjax.parallel.StepConfig` of ``cfg`` (LV gather map built here)."""
    lv_map = None
    if cfg.attack == "lotka_volterra":
        lv_map = data.lotka_volterra_map(image_hw[0], image_hw[1], cfg.aug_level)
    return parallel.StepConfig(
        num_workers=cfg.num_workers,
        num_byzantine=cfg.num_byzantine,
        rule=cfg.rule,
        rule_hparams=tuple(sorted(cfg.rule_hparams.items())),
        attack=cfg.attack,
        attack_hparams=tuple(sorted(cfg.attack_hparams.items())),
        aug_level=cfg.aug_level,
        worker_momentum=cfg.worker_momentum,
        layout=cfg.layout,
        lv_map=lv_map,
        num_classes=num_classes,
        drop_prob=cfg.drop_prob,
    )


@dataclasses.dataclass
class Setup:
    """Everything :func:`run` builds before the loop (also used by benchmarks/train_step.py)."""

    dataset: data.Dataset
    model: Any
    tx: Any
    mesh: Any
    step_fn: Callable
    layout: str
    layout_note: str
    state: parallel.TrainState
    sampler: data.WorkerSampler
    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray | None
    val_y: np.ndarray | None
    steps_per_epoch: int
    step_config: parallel.StepConfig

    def batch(self, step: int) -> tuple[jax.Array, jax.Array]:
        """The global (p, B, ...) inputs and (p, B) labels of ``step``, sharded along workers."""
        idx = self.sampler.indices(step)
        return _global_array(self.mesh, self.train_x[idx]), _global_array(self.mesh, self.train_y[idx])


def setup(cfg: TrainConfig, dataset: data.Dataset | None = None) -> Setup:
    """Validate ``cfg``, load data, shard it, build the model, optimiser, mesh, step and initial state."""
    cfg.validate()
    ds = dataset or data.load_dataset(cfg.dataset, cfg.data_dir or None)
    train_x, train_y, val_x, val_y = _split_validation(ds, cfg.val_fraction, cfg.seed)
    shards = data.shard_indices(train_y, cfg.num_workers, scheme=cfg.shard, alpha=cfg.dirichlet_alpha, seed=cfg.seed)
    sampler = data.WorkerSampler(shards, cfg.batch_size, seed=cfg.seed)
    steps_per_epoch = max(1, min(len(s) for s in shards) // cfg.batch_size)

    model = models.make_model(cfg.model, ds.num_classes)
    variables = model.init(jax.random.key(cfg.seed), jnp.zeros((1, *train_x.shape[1:]), jnp.float32))
    params = variables["params"]
    stats = variables.get("batch_stats", {})
    tx = make_optimizer(cfg, steps_per_epoch)

    n_dev = cfg.num_devices or max(d for d in range(1, jax.device_count() + 1) if cfg.num_workers % d == 0)
    mesh = parallel.make_mesh(n_dev)
    scfg = step_config(cfg, ds.num_classes, train_x.shape[1:3])
    step_fn, layout, note = parallel.build_step(model, tx, scfg, mesh, params)
    rep = NamedSharding(mesh, P())
    state = parallel.TrainState(
        step=jnp.int32(0),
        params=params,
        batch_stats=stats,
        opt_state=tx.init(params),
        worker_mom=parallel.init_worker_momentum(scfg, params, mesh),
        key=jax.random.key_data(jax.random.key(cfg.seed + 1)),
        prev_agg=parallel.init_prev_aggregate(scfg, params, mesh),
    )
    state = state._replace(
        **{k: jax.device_put(getattr(state, k), rep) for k in ("step", "params", "batch_stats", "opt_state", "key")}
    )
    return Setup(
        ds,
        model,
        tx,
        mesh,
        step_fn,
        layout,
        note,
        state,
        sampler,
        train_x,
        train_y,
        val_x,
        val_y,
        steps_per_epoch,
        scfg,
    )


def run(
    cfg: TrainConfig,
    *,
    on_step: Callable[[int, dict], None] | None = None,
    on_eval: Callable[[int, dict], None] | None = None,
    dataset: data.Dataset | None = None,
) -> RunResult:
    """Train with ``cfg``; write ``out_dir/metrics.jsonl`` (and checkpoints); return a :class:`RunResult`.

    ``dataset`` overrides loading (tests pass small synthetic sets). Metrics lines: ``step``, ``loss``
    (mean over honest workers), ``train_accuracy``, ``wall_time`` (s since start), ``step_time`` (s),
    ``agg_norm``, and for FA ``ratios`` (p,) and ``status``; evaluation lines add ``test_accuracy``,
    ``test_loss`` (and ``val_accuracy`` with a validation split).
    """
    su = setup(cfg, dataset)
    ds, model, step_fn, layout, note, state = su.dataset, su.model, su.step_fn, su.layout, su.layout_note, su.state
    val_x, val_y, steps_per_epoch = su.val_x, su.val_y, su.steps_per_epoch
    out = Path(cfg.out_dir)
    is_main = jax.process_index() == 0
    if is_main:
        out.mkdir(parents=True, exist_ok=True)

    ckpt = _checkpoint_manager(out / "checkpoints") if (cfg.checkpoint_every or cfg.resume) else None
    history: list[dict] = []
    metrics_path = out / "metrics.jsonl"
    start_step = 0
    if cfg.resume and ckpt is not None and ckpt.latest_step() is not None:
        import orbax.checkpoint as ocp

        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
        state = ckpt.restore(ckpt.latest_step(), args=ocp.args.StandardRestore(abstract))
        start_step = int(state.step)
        if metrics_path.exists():
            history = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
            history = [h for h in history if h["step"] <= start_step]
    honest = cfg.num_workers - (cfg.num_byzantine if cfg.attack not in ("none",) else 0)

    def write_history():
        if is_main:
            tmp = metrics_path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(h) + "\n" for h in history))
            os.replace(tmp, metrics_path)

    t0 = time.perf_counter()
    for step in range(start_step, cfg.steps):
        x, y = su.batch(step)
        ts = time.perf_counter()
        state, m = step_fn(state, x, y)
        m = jax.device_get(m)  # blocks: on CPU this also avoids the many-device rendezvous deadlock
        step_time = time.perf_counter() - ts
        done = step + 1
        rec = None
        if done % max(cfg.log_every, 1) == 0 or done == cfg.steps or (cfg.eval_every and done % cfg.eval_every == 0):
            rec = {
                "step": done,
                "loss": float(np.mean(m["loss"][:honest])),
                "train_accuracy": float(np.mean(m["accuracy"][:honest])),
                "wall_time": time.perf_counter() - t0,
                "step_time": step_time,
                "agg_norm": float(m["agg_norm"]),
                "lr": float(cfg.lr * cfg.lr_decay ** (step // max(1, round(cfg.lr_decay_epochs * steps_per_epoch)))),
            }
            if "ratios" in m:
                rec["ratios"] = [round(float(v), 6) for v in m["ratios"]]
                rec["status"] = int(m["status"])
            if "mean_ratios" in m:
                rec["mean_ratios"] = [round(float(v), 6) for v in m["mean_ratios"]]
            if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps:
                params_h = jax.device_get(state.params)
                stats_h = jax.device_get(state.batch_stats)
                rec["test_loss"], rec["test_accuracy"] = _evaluate(
                    model, params_h, stats_h, ds.test_x, ds.test_y, cfg.eval_examples
                )
                if val_x is not None:
                    rec["val_loss"], rec["val_accuracy"] = _evaluate(model, params_h, stats_h, val_x, val_y, 0)
                if on_eval:
                    on_eval(done, rec)
            history.append(rec)
        if on_step:
            on_step(done, rec or {"step": done, "loss": float(np.mean(m["loss"][:honest]))})
        if ckpt is not None and cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
            import orbax.checkpoint as ocp

            write_history()
            ckpt.save(done, args=ocp.args.StandardSave(state))
            ckpt.wait_until_finished()
    write_history()
    if ckpt is not None:
        import orbax.checkpoint as ocp

        ckpt.save(cfg.steps, args=ocp.args.StandardSave(state), force=True)
        ckpt.wait_until_finished()
        ckpt.close()
    final = history[-1] if history else {}
    return RunResult(cfg, final, history, metrics_path, state, layout, note, jax.device_get(state.params))


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
