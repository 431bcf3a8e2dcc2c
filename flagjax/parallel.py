"""Data-parallel Byzantine-robust training steps: a 1-D ``workers`` mesh, per-worker gradients under
``jax.shard_map``, attacks, aggregation in one of two layouts, and the optax update.

p logical workers are spread over the mesh's n devices (p / n per device, ``vmap`` inside), so p = 15
runs on 1, 3, 5 or 15 devices with the same numbers. Worker i < p - f is honest; the last f are
Byzantine: either their gradient rows are replaced by an attack (which sees the round's honest rows)
or, for data-level attacks (``lotka_volterra``, ``noise``, ``label_flip``), they compute honest
gradients on transformed data ("augmented losses").

Layouts (docs/design.md section 3):

* ``server``: the shard_map body only computes per-worker gradients (no collectives in the body); the
  (p, D) stack is gathered (an SPMD all-gather: every device acts as the parameter server on the same
  stack, which costs the traffic of gather + broadcast without a single hot device), attacked,
  aggregated by any registered rule, and the update applied, all in one ``jit``.
* ``sharded``: after computing its workers' gradients, each device exchanges slices (all-to-all) so it
  holds a D / n slice of *every* worker's gradient. Coordinate-wise rules run on the slice; FA and the
  (normalised) mean psum partial Gram matrices / norms and apply their p coefficients to the slice;
  the aggregate slices are all-gathered. Per-device traffic is ~2 D (like an all-reduce), independent
  of p. Rules or attacks that need whole rows fall back to ``server`` (``resolve_layout`` says why).

JAX traps handled here (docs/jax_traps.md): under ``check_vma=True`` ``jax.grad`` w.r.t. replicated
parameters returns the psum over the axis, so the body runs with ``check_vma=False`` and per-worker
gradients are tested to be per worker; on CPU with many simulated devices the training loop blocks on
every step (collectives in a body dispatched back-to-back can deadlock on 2 cores).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.extend.core import jaxprs_in_params
from jax.flatten_util import ravel_pytree
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from flagjax import aggregators, attacks, solver
from flagjax import sketch as sketching
from flagjax.aggregators.distance import is_previous

__all__ = [
    "AXIS",
    "make_mesh",
    "StepConfig",
    "TrainState",
    "resolve_layout",
    "build_step",
    "attacked_stack",
    "step_keys",
    "init_worker_momentum",
    "init_rule_state",
    "uses_previous_center",
]

AXIS = "workers"
KEY_NAMES = ("data", "attack", "rule", "drop")


def step_keys(key: jax.Array) -> dict[str, jax.Array]:
    """The step's keys by name: ``split(key, 4)`` into data (data-level attacks), attack, rule and drop
    (stragglers). Every device of every layout gets the same four keys (docs/design.md, "Keys");
    nothing else derives keys from small ``fold_in`` constants, so no two uses can collide."""
    return dict(zip(KEY_NAMES, jax.random.split(key, len(KEY_NAMES)), strict=True))


def make_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
    """1-D mesh with axis ``workers`` over the first ``num_devices`` devices (all by default; in a
    multi-process run, all global devices)."""
    devs = jax.devices()
    n = len(devs) if num_devices is None else num_devices
    if not 1 <= n <= len(devs):
        raise ValueError(f"num_devices must be in [1, {len(devs)}] (the available devices); got {n}")
    return jax.make_mesh((n,), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devs[:n])


@dataclasses.dataclass(frozen=True, eq=False)
class StepConfig:
    """Static description of one training step (everything that shapes the compiled program).

    Attributes:
      num_workers: p. num_byzantine: f (the last f workers).
      rule: aggregation spec, e.g. "flag" or "nnm+krum". rule_hparams: its hyperparameters.
      attack: a registered attack (``flagjax.attacks.names()``): a gradient attack, or a data-level one
        (``data_level=True``: lotka_volterra, noise, label_flip, none).
      attack_hparams: its hyperparameters. aug_level: LV time t or noise sigma for data attacks.
      worker_momentum: beta of per-worker momentum m <- beta m + (1 - beta) g (0 = off).
      layout: "server" or "sharded" (see module docstring).
      lv_map: (H*W,) gather map for ``lotka_volterra`` (from ``flagjax.data.lotka_volterra_map``).
      num_classes: labels for ``label_flip`` (y -> num_classes - 1 - y).
      drop_prob: stragglers/dropouts: each round every worker's row is missing with this probability.
        A missing row is sent as NaN, i.e. treated as Byzantine input: robust rules zero or drop it
        (FA gives it weight 0), so the declared f must cover attackers plus expected dropouts; the
        mean is poisoned (documented: it is not robust).
      worker_grads: how a device computes its workers' gradients: "vmap" (one batched program),
        "loop" (one gradient program per worker, unrolled in the step: the same numbers up to float
        rounding) or "auto" (the default: "loop" on CPU devices for a model with a convolution and at
        most :data:`LOOP_MAX_WORKERS` workers per device, "vmap" otherwise; see :func:`use_worker_loop`).
    """

    num_workers: int
    num_byzantine: int = 0
    rule: str = "flag"
    rule_hparams: tuple = ()
    attack: str = "none"
    attack_hparams: tuple = ()
    aug_level: float = 0.0
    worker_momentum: float = 0.0
    layout: str = "server"
    lv_map: Any = None
    num_classes: int = 10
    drop_prob: float = 0.0
    worker_grads: str = "auto"


WORKER_GRADS = ("auto", "vmap", "loop")
#: "auto" loops over at most this many workers per device (the step's program grows with each one)
LOOP_MAX_WORKERS = 16


def _has_convolution(jaxpr) -> bool:
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            return True
        for sub in jaxprs_in_params(eqn.params):
            if _has_convolution(sub):
                return True
    return False


def use_worker_loop(mode: str, platform: str, workers: int, fn: Callable, *example) -> bool:
    """Whether a device computes its ``workers`` per-worker gradients ``fn(*example)`` one program per
    worker ("loop") rather than as one vmapped program.

    ``mode`` "auto" loops on CPU when ``fn`` has a convolution and 2 <= ``workers`` <= LOOP_MAX_WORKERS:
    XLA:CPU runs a vmapped convolution's per-worker weight gradient as one grouped convolution, which is
    slow, while the unrolled workers' plain convolutions run as independent programs across the cores
    (the paper CNN's 10 workers x 25 images: 50.8 -> 29.6 ms, benchmarks/results/peer_step.md; an MLP's
    gradients were slower unrolled, so it keeps vmap: docs/guide.md, "Against ByzFL's training loop").

    Args:
      mode: "auto", "vmap" or "loop" (:data:`WORKER_GRADS`). platform: the device's platform, e.g. "cpu".
      workers: the number of workers on the device. fn: one worker's gradient function.
      example: arguments of one worker's ``fn`` (arrays or tracers; only their shapes are used, to
        trace ``fn`` for a convolution when ``mode`` is "auto").
    """
    if mode not in WORKER_GRADS:
        raise ValueError(f"worker_grads must be one of {WORKER_GRADS}; got {mode!r}")
    if mode != "auto":
        return mode == "loop"
    if platform != "cpu" or workers > LOOP_MAX_WORKERS or workers < 2:
        return False
    return _has_convolution(jax.make_jaxpr(fn)(*example).jaxpr)


class TrainState(NamedTuple):
    """Everything a step reads and writes (a pytree: checkpointed by orbax as is).

    Attributes:
      step: () int32. params, batch_stats: model variables (replicated).
      opt_state: optax state.
      worker_mom: (p, D) per-worker momentum (an unused (p, 1) placeholder when off). Worker momentum
        is the honest workers' own transform (each sends an EMA of its gradients, Karimireddy et al.
        2021), computed before anything reaches the aggregator, so it lives with the workers' step
        and not in the rule: a rule sees only what workers send, and Byzantine rows replace the sent
        rows whatever the honest workers' state.
      key: PRNG key data (uint32), folded with the step for attacks and noise.
      rule_state: the aggregation rule's own state (``Rule.init`` / ``Rule.update``): e.g.
        :class:`flagjax.aggregators.CenterState` for centered clipping with ``center="previous"``;
        ``()`` for stateless rules.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    worker_mom: jax.Array
    key: jax.Array
    rule_state: Any


def uses_previous_center(cfg: StepConfig) -> bool:
    """Whether the rule (or the rule an optimal attack simulates) is centred on the previous aggregate
    (``center="previous"`` in ``rule_hparams`` / ``attack_hparams["rule_hparams"]``)."""
    atk_rule_hp = dict(dict(cfg.attack_hparams).get("rule_hparams") or {})
    return is_previous(dict(cfg.rule_hparams).get("center")) or is_previous(atk_rule_hp.get("center"))


def _with_rule_center(hparams: dict, rule_state) -> dict:
    """``hparams`` with ``center="previous"`` replaced by the defence's previous aggregate, read from its
    rule state (an optimal attack simulating centered clipping from the previous aggregate)."""
    if is_previous(hparams.get("center")):
        return {**hparams, "center": rule_state.center}
    return hparams


def resolve_layout(cfg: StepConfig, num_devices: int) -> tuple[str, str]:
    """(layout actually used, reason) — ``sharded`` falls back to ``server`` when it cannot apply."""
    if cfg.layout not in ("server", "sharded"):
        raise ValueError(f"layout must be 'server' or 'sharded'; got {cfg.layout!r}")
    if cfg.layout == "server":
        return "server", ""
    rule, pre = aggregators.parse_spec(cfg.rule)
    if pre:
        return "server", f"pre-aggregators {pre} need whole rows"
    if aggregators.get(rule).keeps_state(cfg.num_workers, **dict(cfg.rule_hparams)):
        return "server", f"rule {rule!r} keeps a state across rounds"
    if not aggregators.get(rule).shardable:
        ok = ", ".join(n for n in aggregators.names() if aggregators.get(n).shardable)
        return "server", f"rule {rule!r} needs whole rows (sharded supports {ok})"
    if not attacks.get(cfg.attack).separable:
        return "server", f"attack {cfg.attack!r} needs whole rows"
    return "sharded", ""


def _check(cfg: StepConfig, num_devices: int) -> None:
    p, f = cfg.num_workers, cfg.num_byzantine
    if p < 1 or p % num_devices:
        raise ValueError(f"num_workers={p} must be a positive multiple of the number of devices ({num_devices})")
    if not 0 <= f < p:
        raise ValueError(f"num_byzantine={f} must satisfy 0 <= f < num_workers={p}")
    attacks.get(cfg.attack)
    rule, pre = aggregators.parse_spec(cfg.rule)
    r = aggregators.get(rule)
    for name in pre:
        aggregators.get_pre(name)
    try:
        r.check_f(f, p)  # the rule's own limit (Rule.check_f), the one place it is checked
    except ValueError as err:
        raise ValueError(f"num_byzantine={f}: {err}") from None
    _check_center("rule_hparams", cfg.rule_hparams, rule)
    atk_hp = dict(cfg.attack_hparams)
    if atk_hp.get("rule_hparams"):  # the rule an optimal attack simulates (its default: the mean)
        sim_rule = aggregators.parse_spec(atk_hp.get("rule") or "mean")[0]
        _check_center("attack_hparams.rule_hparams", atk_hp["rule_hparams"], sim_rule)
        if is_previous(dict(atk_hp["rule_hparams"]).get("center")) and not is_previous(
            dict(cfg.rule_hparams).get("center")
        ):
            raise ValueError(
                "attack_hparams.rule_hparams.center='previous' simulates the defence's previous aggregate, which "
                "only a rule centred on it keeps (rule_hparams center='previous')"
            )
    if cfg.attack == "lotka_volterra" and cfg.lv_map is None:
        raise ValueError("attack 'lotka_volterra' needs lv_map (flagjax.data.lotka_volterra_map)")


def _check_center(where: str, hparams, rule: str) -> None:
    """``center`` in ``hparams`` is absent, an array, or "previous" for a rule that takes a center."""
    center = dict(hparams).get("center")
    if isinstance(center, str) and center != "previous":
        raise ValueError(f"{where}.center must be 'previous' or a (D,) array; got {center!r}")
    if is_previous(center) and "center" not in inspect.signature(aggregators.get(rule).fn).parameters:
        raise ValueError(f"{where}.center='previous' needs a rule with a center argument; {rule!r} has none")


def _data_attack(cfg: StepConfig, x, y, worker_idx, key):
    """Data-level attacks transform the Byzantine workers' inputs; x (pl, B, H, W, C), y (pl, B)."""
    if not attacks.get(cfg.attack).data_level or cfg.num_byzantine == 0:
        return x, y
    byz = worker_idx >= cfg.num_workers - cfg.num_byzantine  # (pl,)
    return attacks.data_transform(
        cfg.attack,
        x,
        y,
        byz,
        key,
        worker_idx=worker_idx,
        aug_level=cfg.aug_level,
        lv_map=cfg.lv_map,
        num_classes=cfg.num_classes,
    )


def _drop_rows(cfg: StepConfig, stack, key):
    """Rows of workers that did not report this round become NaN (see ``StepConfig.drop_prob``)."""
    if cfg.drop_prob <= 0:
        return stack
    missing = jax.random.bernoulli(key, cfg.drop_prob, (cfg.num_workers,))
    return jnp.where(missing[:, None], jnp.nan, stack)


def attacked_stack(cfg: StepConfig, stack, key, rule_state=(), offset=0):
    """The stack the aggregator receives: the last f rows of the (p, D) ``stack`` (or of a (p, D/n)
    coordinate slice starting at global column ``offset``) replaced by ``cfg.attack``'s rows, crafted
    from the first p - f (honest) rows with ``key`` (the step's attack key). An optimal attack that
    simulates a rule centred on the previous aggregate gets the defence's ``rule_state`` center.
    Data-level attacks and f = 0 leave the stack as is."""
    if attacks.get(cfg.attack).data_level or cfg.num_byzantine == 0:
        return stack
    f = cfg.num_byzantine
    honest = stack[: cfg.num_workers - f]
    hp = dict(cfg.attack_hparams)
    if hp.get("rule_hparams"):  # an optimal attack simulates the rule, previous center included
        hp["rule_hparams"] = _with_rule_center(dict(hp["rule_hparams"]), rule_state)
    byz = attacks.attack(cfg.attack, honest, f=f, key=key, offset=offset, **hp)
    return jnp.concatenate([honest, byz.astype(stack.dtype)])


def _sharded_aggregate(cfg: StepConfig, slices, key):
    """Aggregate a (p, D/n) slice of every worker's gradient; collectives over ``workers``.

    A ``coordinatewise`` rule runs on the slice as is; a rule with a ``gram`` form gets the psum of
    the partial Gram matrices and its coefficients are applied to the slice (Rule docstring). With
    ``sketch=k`` the devices psum their partial (p, k) sketches and squared norms instead (the slice
    on device i starts at global column i * D/n), which add up to the whole rows' sketch: the same
    numbers as the server layout."""
    rule_name, _ = aggregators.parse_spec(cfg.rule)
    rule = aggregators.get(rule_name)
    hp = dict(cfg.rule_hparams)
    aggregators.check_sketch_hparams(rule, hp, "rule_hparams")
    k = hp.pop("sketch", 0)
    sketch_seed = hp.pop("sketch_seed", None)
    f = cfg.num_byzantine
    finite = lax.pmin(jnp.all(jnp.isfinite(slices), axis=1).astype(jnp.int32), AXIS) > 0
    clean = jnp.where(finite[:, None], slices, 0)
    if rule.gram is not None and not rule.coordinatewise:
        clean = clean.astype(jnp.promote_types(slices.dtype, jnp.float32))
        if k:
            offset = lax.axis_index(AXIS) * clean.shape[1]
            seed = sketching.resolve_seed(sketch_seed, key)
            S, n2 = lax.psum(sketching.sketch_and_norms(clean, k, seed=seed, offset=offset), AXIS)
            raw = sketching.sketch_gram_from_parts(S, n2)
        else:
            raw = lax.psum(solver.gram_matrix(clean), AXIS)
        c, info = rule.gram(raw, finite, f=f, key=key, **hp)
        return jnp.dot(c.astype(clean.dtype), clean, precision=lax.Precision.HIGHEST), info
    return rule.fn(clean if rule.sanitize else slices, f=f, key=key, **hp), {}


def _server_aggregate(cfg: StepConfig, stack, key, rule_state=()):
    """(aggregate, new rule state, info) of the whole (p, D) stack."""
    rule, pre = aggregators.parse_spec(cfg.rule)
    hp = dict(cfg.rule_hparams)
    agg, rule_state, info = aggregators.aggregate_update(
        cfg.rule, stack, rule_state, f=cfg.num_byzantine, key=key, **hp
    )
    if rule == "flag" and not pre:
        # the paper's Fig. 3 comparison: reconstruction ratios on the (1-D) mean direction
        m = aggregators.mean(stack)
        cos2 = jnp.dot(stack, m) ** 2 / (jnp.einsum("pd,pd->p", stack, stack) * jnp.dot(m, m))
        info = {**info, "mean_ratios": jnp.nan_to_num(cos2)}
    return agg, rule_state, info


def _merged(static: tuple, traced: dict | None) -> tuple:
    """Static hyperparameters with the run's traced values laid over them (as a sorted items tuple)."""
    if not traced:
        return static
    merged = dict(static)
    merged.update(traced)
    return tuple(sorted(merged.items()))


def build_step(
    model,
    make_tx: Callable[[dict], optax.GradientTransformation],
    cfg: StepConfig,
    mesh: jax.sharding.Mesh,
    params_template: Any,
    *,
    jit: bool = True,
) -> tuple[Callable, str, str]:
    """Compile-ready ``step(state, x, y, hp) -> (state, metrics)`` for ONE run; the training loop
    ``jax.vmap``s it over a batch of runs (``flagjax.train.train_and_evaluate``).

    ``hp`` holds the run's values of everything that may differ between the runs of one program
    without changing its shapes: ``hp["rule"]`` and ``hp["attack"]`` (dicts laid over
    ``cfg.rule_hparams`` / ``cfg.attack_hparams``, traced) and ``hp["opt"]`` (passed to ``make_tx``).

    Args:
      model: a Flax Linen module called as ``model.apply(variables, x, train=True)``.
      make_tx: ``make_tx(hp["opt"]) -> optax.GradientTransformation`` applied to the aggregate; its
        state's structure must not depend on the values (``flagjax.train.optimizer_factory``).
      cfg: :class:`StepConfig` (static).
      mesh: from :func:`make_mesh`.
      params_template: a params pytree (for flattening).
      jit: ``False`` returns the raw function (to ``vmap`` before jitting).

    ``x`` is (p, B, H, W, C) float32 and ``y`` (p, B) int32, both sharded along workers. Metrics:
    ``loss`` (p,), ``accuracy`` (p,) per worker's batch (NaN for the Byzantine rows on one device under a
    gradient attack, where their gradients are not computed), ``agg_norm``, and for FA ``ratios`` (p,)
    and ``status``. Returns (step, layout used, fallback reason).
    """
    n = mesh.shape[AXIS]
    _check(cfg, n)
    layout, why = resolve_layout(cfg, n)
    p = cfg.num_workers
    pl = p // n
    _, unravel = ravel_pytree(params_template)
    D = ravel_pytree(params_template)[0].shape[0]
    Ds = -(-D // n)
    beta = float(cfg.worker_momentum)
    platform = mesh.devices.flat[0].platform

    def loss_fn(params, stats, x, y):
        has_bn = bool(jax.tree_util.tree_leaves(stats))
        variables = {"params": params, **({"batch_stats": stats} if has_bn else {})}
        if has_bn:
            logits, upd = model.apply(variables, x, train=True, mutable=["batch_stats"])
            new_stats = upd["batch_stats"]
        else:
            logits, new_stats = model.apply(variables, x, train=True), stats
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, (new_stats, jnp.mean(jnp.argmax(logits, -1) == y))

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def worker_rows(params, stats, mom, x, y, key, device=None):
        """Per-device body part: this device's pl workers -> their (pl, D) rows."""
        device = lax.axis_index(AXIS) if device is None else device
        widx = device * pl + jnp.arange(pl)
        x, y = _data_attack(cfg, x, y, widx, step_keys(key)["data"])
        if use_worker_loop(cfg.worker_grads, platform, x.shape[0], grad_fn, params, stats, x[0], y[0]):
            outs = [grad_fn(params, stats, x[i], y[i]) for i in range(x.shape[0])]
            (loss, (new_stats, acc)), g = jax.tree.map(lambda *a: jnp.stack(a), *outs)
        else:
            (loss, (new_stats, acc)), g = jax.vmap(grad_fn, in_axes=(None, None, 0, 0))(params, stats, x, y)
        rows = jax.vmap(lambda t: ravel_pytree(t)[0])(g)
        if beta > 0:
            mom = beta * mom + (1 - beta) * rows
            rows = mom
        return rows, loss, acc, new_stats, mom

    def with_hp(hp):
        return dataclasses.replace(
            cfg,
            rule_hparams=_merged(cfg.rule_hparams, hp.get("rule")),
            attack_hparams=_merged(cfg.attack_hparams, hp.get("attack")),
        )

    def body_server(params, stats, mom, x, y, key):
        return worker_rows(params, stats, mom, x, y, key)

    def body_sharded(params, stats, mom, x, y, key, hp):
        scfg = with_hp(hp)
        rows, loss, acc, new_stats, mom = worker_rows(params, stats, mom, x, y, key)
        rows = jnp.pad(rows, ((0, 0), (0, n * Ds - D)))
        slices = lax.all_to_all(rows, AXIS, split_axis=1, concat_axis=0, tiled=True)  # (p, Ds)
        keys = step_keys(key)  # the same keys on every device
        slices = attacked_stack(scfg, slices, keys["attack"], offset=lax.axis_index(AXIS) * Ds)
        slices = _drop_rows(cfg, slices, keys["drop"])  # same mask on every device
        agg_slice, info = _sharded_aggregate(scfg, slices, keys["rule"])
        agg = lax.all_gather(agg_slice, AXIS, tiled=True)[:D]
        return agg, loss, acc, new_stats, mom, info

    rep = P()
    wk = P(AXIS)
    if layout == "server" and n == 1:
        # one device: no shard_map needed
        f = cfg.num_byzantine
        h = p - f

        def mapped(params, stats, mom, x, y, key):
            if f == 0 or attacks.get(cfg.attack).data_level or jax.tree_util.tree_leaves(stats):
                return worker_rows(params, stats, mom, x, y, key, device=0)
            # a gradient attack overwrites the last f rows (attacked_stack): only the h honest workers'
            # gradients are computed. Their rows, losses and momentum are the same as when all p are;
            # the Byzantine rows are zeros until the attack replaces them, and their loss and accuracy
            # NaN (the training log averages the honest workers' only). Models with BatchNorm compute
            # all p, since every worker's batch statistics enter the running averages.
            rows, loss, acc, new_stats, mom_h = worker_rows(params, stats, mom[:h], x[:h], y[:h], key, device=0)
            nan = jnp.full((f,), jnp.nan, loss.dtype)
            rows = jnp.concatenate([rows, jnp.zeros((f, rows.shape[1]), rows.dtype)])
            mom = jnp.concatenate([mom_h, mom[h:]])
            return rows, jnp.concatenate([loss, nan]), jnp.concatenate([acc, nan.astype(acc.dtype)]), new_stats, mom

    elif layout == "server":
        mapped = jax.shard_map(
            body_server,
            mesh=mesh,
            in_specs=(rep, rep, wk, wk, wk, rep),
            out_specs=(wk, wk, wk, wk, wk),
            check_vma=False,
        )
    else:
        mapped = jax.shard_map(
            body_sharded,
            mesh=mesh,
            in_specs=(rep, rep, wk, wk, wk, rep, rep),
            out_specs=(rep, wk, wk, wk, wk, rep),
            check_vma=False,
        )

    replicated = NamedSharding(mesh, rep)

    def step(state: TrainState, x, y, hp):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
        scfg = with_hp(hp)
        if layout == "server":
            rows, loss, acc, stats_w, mom = mapped(state.params, state.batch_stats, state.worker_mom, x, y, key)
            # gather to the server(s) (a no-op on one device)
            stack = rows if n == 1 else lax.with_sharding_constraint(rows, replicated)
            keys = step_keys(key)
            stack = attacked_stack(scfg, stack, keys["attack"], state.rule_state)
            stack = _drop_rows(cfg, stack, keys["drop"])
            agg, rule_state, info = _server_aggregate(scfg, stack, keys["rule"], state.rule_state)
        else:
            agg, loss, acc, stats_w, mom, info = mapped(
                state.params, state.batch_stats, state.worker_mom, x, y, key, hp
            )
            rule_state = state.rule_state  # sharded rules are stateless (resolve_layout)
        stats = jax.tree.map(lambda s: jnp.mean(s, axis=0), stats_w)
        grads = unravel(agg.astype(jnp.float32))
        updates, opt_state = make_tx(hp.get("opt", {})).update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = TrainState(state.step + 1, params, stats, opt_state, mom, state.key, rule_state)
        metrics = {"loss": loss, "accuracy": acc, "agg_norm": jnp.linalg.norm(agg), **info}
        # replicated, so every process (multi-host) can read them
        if n > 1:
            metrics = jax.tree.map(lambda a: lax.with_sharding_constraint(a, replicated), metrics)
        return new, metrics

    if not jit:
        return step, layout, why
    return jax.jit(step, donate_argnums=(0,)), layout, why


def init_worker_momentum(cfg: StepConfig, params_template, mesh=None):
    """(p, D) float32 zeros, the per-worker momentum before step 0 (an unused (p, 1) placeholder when
    worker momentum is off: orbax cannot checkpoint zero-size arrays). With ``mesh``, a global array
    sharded along workers; without, host (numpy) zeros for the caller to place."""
    D = ravel_pytree(params_template)[0].shape[0] if cfg.worker_momentum > 0 else 1
    zeros = np.zeros((cfg.num_workers, D), np.float32)
    if mesh is None:
        return zeros
    return jax.device_put(zeros, NamedSharding(mesh, P(AXIS)))


def init_rule_state(cfg: StepConfig, params_template) -> Any:
    """The rule's state before step 0 (``Rule.init`` for a (p, D) float32 example of the stack): e.g. a
    zero :class:`flagjax.aggregators.CenterState` for centered clipping centred on its previous aggregate,
    a zero :class:`flagjax.aggregators.FlagState` for FA with ``warm_start``; ``()`` for stateless rules."""
    D = ravel_pytree(params_template)[0].shape[0]
    example = jax.ShapeDtypeStruct((cfg.num_workers, D), jnp.float32)
    return aggregators.init_state(cfg.rule, example, f=cfg.num_byzantine, **dict(cfg.rule_hparams))
