"""Aggregation rules on a (p, d) stack of worker gradients, and the registry that names them.

Every rule is a pure function ``fn(stack, *, f, key, **hparams) -> (d,)`` on a (p, d) float array,
where ``f`` is the declared number of Byzantine workers and ``key`` a PRNG key (ignored by
deterministic rules). :func:`aggregate` is the front door: it accepts a (p, d) array or a pytree whose
leaves share the leading axis p, checks the arguments, and returns the same structure without that
axis. Jit it with the rule name, ``f`` and structural hyperparameters (``r``, ``max_iters``,
``output``) static.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flagjax import sketch as sketching
from flagjax.registry import Registry

__all__ = [
    "Rule",
    "PreAggregator",
    "aggregate",
    "names",
    "pre_names",
    "get",
    "get_pre",
    "register",
    "register_pre",
    "unregister",
    "init_state",
    "aggregate_update",
    "RULES",
    "PRE_AGGREGATORS",
    "flatten_stack",
    "sanitize_rows",
    "parse_spec",
    "check_sketch_hparams",
    "SKETCH_HPARAMS",
]


def _any_f(p: int) -> int:
    return p - 1


def _stateless_init(example, **hparams):
    del example, hparams
    return ()


@dataclasses.dataclass(frozen=True)
class Rule:
    """A registered aggregation rule.

    Attributes:
      name: registry name.
      fn: ``fn(stack, *, f, key, **hparams) -> (d,)`` on a (p, d) array.
      max_f: ``max_f(p) -> int``, the largest f the rule is defined for (checked by ``aggregate``).
      requirement: the (p, f) requirement in words, used in error messages.
      sanitize: replace non-finite rows by zero rows before ``fn`` (robust rules: a NaN/Inf row is
        Byzantine input, and a zero row is a bounded stand-in for it). ``mean`` and ``flag`` (which
        drops such rows itself) do not.
      coordinatewise: ``fn`` on a column slice of the stack gives that slice of the aggregate (the
        sharded training layout runs it on each device's slice as is).
      gram: optional Gram-space form of the rule, ``gram(raw, ok, *, f, key, **hp) -> (c (p,), info)``
        with ``raw`` (p, p) the Gram matrix of the rows (non-finite rows zeroed, ``ok`` (p,) bool
        marks the finite ones) and the aggregate ``sum_i c_i g_i``. The sharded layout psums partial
        Gram matrices, calls it, and applies ``c`` to its slice (docs/design.md section 3).
      needs_key: whether the output depends on ``key`` (randomised rules).
      sketchable: whether the rule works from the Gram matrix and takes ``sketch=k`` (and
        ``sketch_seed``): its inner products then come from a k-column count sketch of the rows
        (:mod:`flagjax.sketch`; exact norms, exact combination of the rows), and its output depends on
        ``key`` unless ``sketch_seed`` is given. ``aggregate`` and the training config refuse ``sketch``
        for the other rules by name.
      init: ``init(example, **hp) -> state``, the rule's state before the first round (optax-style;
        ``example`` a (p, d) array or ``jax.ShapeDtypeStruct`` shaped like the stack the rule will see,
        after any pre-aggregators). Default: ``()`` (stateless).
      static_hparams: the hyperparameters that set the program's structure (shapes, trip counts,
        branches, the state's layout), which must be Python values and so cannot take several values in
        one batched program (the training config refuses ``Values`` for them by name); every other
        hyperparameter is used as a traced number. ``sketch`` is static for every ``sketchable`` rule.
      update: ``update(stack, state, *, f, key, **hp) -> (aggregate (d,), state, info dict)``, one round.
        Default: ``(fn(stack, ...), state, {})``. A stateful rule (centered clipping centred on its
        previous aggregate) keeps what it carries from round to round here; the training step stores
        the state in ``TrainState.rule_state`` and checkpoints it.

    The sharded layout can run a rule when it is ``coordinatewise`` or has a ``gram`` form; the
    capability lives here, not in a list of names elsewhere.
    """

    name: str
    fn: Callable[..., jax.Array]
    max_f: Callable[[int], int] = _any_f
    requirement: str = "0 <= f < p"
    sanitize: bool = True
    coordinatewise: bool = False
    gram: Callable[..., tuple[jax.Array, dict]] | None = None
    needs_key: bool = False
    sketchable: bool = False
    init: Callable[..., Any] | None = None
    update: Callable[..., tuple[jax.Array, Any, dict]] | None = None
    static_hparams: tuple[str, ...] = ()

    def __post_init__(self):
        if self.sketchable and "sketch" not in self.static_hparams:
            object.__setattr__(self, "static_hparams", (*self.static_hparams, "sketch"))
        if self.init is None:
            object.__setattr__(self, "init", _stateless_init)
        if self.update is None:
            fn = self.fn

            def update(stack, state, *, f, key, **hp):
                return fn(stack, f=f, key=key, **hp), state, {}

            object.__setattr__(self, "update", update)

    @property
    def stateful(self) -> bool:
        """Whether the rule defines its own ``init`` (it may still return ``()`` for some hyperparameters)."""
        return self.init is not _stateless_init

    def keeps_state(self, p: int, **hparams) -> bool:
        """Whether ``init`` returns a state with arrays in it for p workers and these hyperparameters
        (centered clipping only with ``center="previous"``, FA only with ``warm_start > 0``)."""
        if not self.stateful:
            return False
        state = jax.eval_shape(lambda: self.init(jax.ShapeDtypeStruct((p, 1), jnp.float32), **hparams))
        return bool(jax.tree_util.tree_leaves(state))

    def check_f(self, f, p: int) -> None:
        """Raise ``ValueError`` unless ``0 <= f <= max_f(p)`` (the one place the limit is checked)."""
        _check_f(f, p, f"rule {self.name!r}", self.max_f(p), self.requirement)

    @property
    def shardable(self) -> bool:
        """Whether the sharded layout can run the rule on coordinate slices."""
        return self.coordinatewise or self.gram is not None


@dataclasses.dataclass(frozen=True)
class PreAggregator:
    """A registered pre-aggregation step: ``fn(stack, *, f, key, **hp) -> (p', d)`` stack.
    ``sketchable``: it works from the Gram matrix and takes ``sketch=k`` (see :class:`Rule`)."""

    name: str
    fn: Callable[..., jax.Array]
    max_f: Callable[[int], int] = _any_f
    requirement: str = "0 <= f < p"
    sketchable: bool = False

    def check_f(self, f, p: int) -> None:
        """Raise ``ValueError`` unless ``0 <= f <= max_f(p)``."""
        _check_f(f, p, f"pre-aggregator {self.name!r}", self.max_f(p), self.requirement)


RULES: Registry[Rule] = Registry("aggregation rule")
PRE_AGGREGATORS: Registry[PreAggregator] = Registry("pre-aggregator")
RULES.share_names_with(PRE_AGGREGATORS)  # rules and pre-aggregators compose by name ("nnm+krum")
PRE_AGGREGATORS.share_names_with(RULES)


def register(rule: Rule) -> Rule:
    """Add ``rule`` to the registry (a new name only) and return it. Users' own rules, stateful or
    not, register the same way and train like the built-in ones."""
    return RULES.register(rule.name, rule)


def register_pre(pre: PreAggregator) -> PreAggregator:
    """Add a pre-aggregator to the registry (a new name only) and return it."""
    return PRE_AGGREGATORS.register(pre.name, pre)


def unregister(name: str) -> None:
    """Remove the rule or pre-aggregator ``name`` (users' own ones, e.g. in tests); ``KeyError`` if unknown."""
    (PRE_AGGREGATORS if name in PRE_AGGREGATORS else RULES).unregister(name)


def names() -> tuple[str, ...]:
    """Names of all registered rules, sorted."""
    return RULES.names()


def pre_names() -> tuple[str, ...]:
    """Names of all registered pre-aggregators, sorted."""
    return PRE_AGGREGATORS.names()


def get(name: str) -> Rule:
    """The :class:`Rule` called ``name``; ``KeyError`` naming the known rules otherwise."""
    return RULES.get(name)


def get_pre(name: str) -> PreAggregator:
    """The :class:`PreAggregator` called ``name``; ``KeyError`` naming the known ones otherwise."""
    return PRE_AGGREGATORS.get(name)


def parse_spec(spec: str) -> tuple[str, tuple[str, ...]]:
    """Split a composed rule spec ``"nnm+clip+krum"`` into ``("krum", ("nnm", "clip"))``."""
    parts = [s for s in str(spec).split("+") if s]
    if not parts:
        raise ValueError(f"rule spec must name a rule, e.g. 'krum' or 'nnm+krum'; got {spec!r}")
    return parts[-1], tuple(parts[:-1])


def flatten_stack(grads: Any) -> tuple[jax.Array, Callable[[jax.Array], Any]]:
    """(p, d) stack from a (p, d) array or a pytree of arrays with a shared leading axis p.

    Returns ``(stack, unflatten)`` where ``unflatten`` maps a (d,) vector back to the input's
    structure without the leading axis. Raises ``ValueError`` naming ``grads`` on a wrong rank,
    empty tree or mismatched leading sizes.
    """
    if isinstance(grads, (jax.Array, np.ndarray)):
        if grads.ndim != 2:
            raise ValueError(
                f"grads must be a (p, d) array with one row per worker (or a pytree of arrays with a "
                f"leading worker axis); got an array of shape {grads.shape}"
            )
        return jnp.asarray(grads), lambda v: v
    leaves, treedef = jax.tree_util.tree_flatten(grads)
    if not leaves:
        raise ValueError("grads must contain at least one array leaf; got an empty pytree")
    leaves = [jnp.asarray(x) for x in leaves]
    for x in leaves:
        if x.ndim < 1:
            raise ValueError("grads leaves must have a leading worker axis p; got a scalar leaf")
    sizes = {x.shape[0] for x in leaves}
    if len(sizes) != 1:
        raise ValueError(f"grads leaves must share the leading worker axis p; got leading sizes {sorted(sizes)}")
    p = leaves[0].shape[0]
    shapes = [x.shape[1:] for x in leaves]
    dtype = jnp.result_type(*leaves)
    stack = jnp.concatenate([x.reshape(p, -1).astype(dtype) for x in leaves], axis=1)
    splits = np.cumsum([math.prod(s) for s in shapes])[:-1].tolist()

    def unflatten(v):
        parts = jnp.split(v, splits)
        return jax.tree_util.tree_unflatten(
            treedef,
            [part.reshape(s).astype(x.dtype) for part, s, x in zip(parts, shapes, leaves, strict=True)],
        )

    return stack, unflatten


def sanitize_rows(stack: jax.Array) -> jax.Array:
    """Rows holding NaN/Inf become zero rows; (p, d) -> (p, d).

    A row is kept when its *sum* is finite (one cheap reduction; NaN or Inf anywhere makes the sum
    non-finite). A finite row whose sum overflows (entries near the float maximum) is zeroed too. The
    ``where`` fuses into the consuming rule (e.g. the sorting network), so clean inputs pay ~2 ms at
    p = 15, d = 1e6 on this CPU (a per-element ``isfinite`` pass cost ~7 ms and a ``lax.cond`` ~30 ms).
    """
    ok = jnp.isfinite(jnp.sum(stack, axis=1))
    return jnp.where(ok[:, None], stack, jnp.zeros((), stack.dtype))


SKETCH_HPARAMS = ("sketch", "sketch_seed")


def check_sketch_hparams(record: Rule | PreAggregator, hparams: dict, where: str = "hparams") -> None:
    """Refuse ``sketch``/``sketch_seed`` in ``hparams`` for a rule or pre-aggregator that does not
    work from the Gram matrix (``ValueError`` naming it and the ones that do), and check the value of
    ``sketch`` (:func:`flagjax.sketch.check_sketch`)."""
    given = [h for h in SKETCH_HPARAMS if h in hparams]
    if not given:
        return
    kind = "rule" if isinstance(record, Rule) else "pre-aggregator"
    if not record.sketchable:
        ok = [n for n in names() if get(n).sketchable] + [n for n in pre_names() if get_pre(n).sketchable]
        raise ValueError(
            f"{where}: {kind} {record.name!r} does not work from the Gram matrix, so it takes no "
            f"{'/'.join(given)}; sketchable: {', '.join(sorted(ok))}"
        )
    if "sketch" in hparams:
        sketching.check_sketch(hparams["sketch"], f"{where}.sketch")


def _check_f(f, p: int, what: str, max_f: int, requirement: str) -> None:
    if isinstance(f, bool) or not isinstance(f, (int, np.integer)):
        raise ValueError(f"f (number of Byzantine workers) must be a Python int; got {f!r}")
    if f < 0 or f > max_f:
        raise ValueError(f"f={f} is out of range for {what} with p={p} workers: requires {requirement} (f <= {max_f})")


def _as_step(item) -> tuple[str, dict]:
    if isinstance(item, str):
        return item, {}
    if isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str):
        return item[0], dict(item[1])
    raise ValueError(f"pre must be a sequence of names or (name, hparams) pairs; got item {item!r}")


def aggregate(
    name: str,
    grads: Any,
    *,
    f: int,
    key: jax.Array | None = None,
    pre: Sequence[str | tuple[str, dict]] = (),
    **hparams,
) -> Any:
    """Aggregate worker gradients with the registered rule ``name``, optionally after pre-aggregators.

    Args:
      name: a registered rule (see :func:`names`), or a composed spec such as ``"nnm+krum"``.
      grads: (p, d) array, or a pytree whose leaves all have leading axis p.
      f: declared number of Byzantine workers (checked against the rule's requirement on (p, f)).
      key: PRNG key for randomised rules and pre-aggregators; ``jax.random.key(0)`` when omitted.
      pre: pre-aggregators applied in order before the rule, as names or ``(name, hparams)`` pairs,
        e.g. ``pre=("nnm", ("clip", {"c": 1.0}))``.
      **hparams: the rule's hyperparameters (see its docstring).

    Returns:
      The aggregate, with the structure of ``grads`` minus the leading axis.
    """
    rule_name, spec_pre = parse_spec(name)
    rule = get(rule_name)
    steps = [_as_step(s) for s in (*spec_pre, *pre)]
    pres = [(get_pre(n), hp) for n, hp in steps]
    stack, unflatten = flatten_stack(grads)
    p = stack.shape[0]
    if p < 1:
        raise ValueError("grads must hold at least one worker (p >= 1)")
    if key is None:
        key = jax.random.key(0)
    check_sketch_hparams(rule, hparams)
    stack = _before_rule(rule, pres, stack, f, key)
    state = rule.init(jax.ShapeDtypeStruct(stack.shape, stack.dtype), **hparams)
    agg, _, _ = rule.update(stack, state, f=int(f), key=key, **hparams)
    return unflatten(agg)


def _before_rule(rule: Rule, pres: list, stack: jax.Array, f: int, key: jax.Array) -> jax.Array:
    """The (p', d) stack the rule sees: pre-aggregators ``pres`` ((record, hparams) pairs) applied in
    order (pre-aggregator i gets ``fold_in(key, i + 1)``), f checked against each and against the rule,
    non-finite rows zeroed for rules that ask for it."""
    for i, (pa, hp) in enumerate(pres):
        check_sketch_hparams(pa, hp, f"pre[{i}] hparams")
        pa.check_f(f, stack.shape[0])
        stack = pa.fn(sanitize_rows(stack), f=int(f), key=jax.random.fold_in(key, i + 1), **hp)
    rule.check_f(f, stack.shape[0])
    return sanitize_rows(stack) if rule.sanitize else stack


def init_state(name: str, example, *, f: int = 0, **hparams) -> Any:
    """The state of rule spec ``name`` (``"nnm+centered_clipping"``: its final rule's) before the first
    round, for a (p, d) ``example`` of the input stack (array or ``jax.ShapeDtypeStruct``); the rule's own
    ``init`` sees the shape that the pre-aggregators give it (``"bucketing+flag"``: p / s rows).
    ``()`` for stateless rules. ``f``: the declared Byzantine count, as for :func:`aggregate_update`."""
    rule_name, pre = parse_spec(name)
    rule = get(rule_name)
    if pre:
        example = jax.eval_shape(
            lambda s: _before_rule(rule, [(get_pre(n), {}) for n in pre], s, f, jax.random.key(0)),
            jax.ShapeDtypeStruct(example.shape, example.dtype),
        )
    return rule.init(example, **hparams)


def aggregate_update(
    name: str, stack: jax.Array, state: Any, *, f: int, key: jax.Array, **hparams
) -> tuple[jax.Array, Any, dict]:
    """One round of rule spec ``name`` with state: ``(aggregate (d,), new state, info)`` for a (p, d)
    ``stack`` (pre-aggregators, which keep no state, run first). :func:`aggregate` is this with the
    state from :func:`init_state`, for one round."""
    rule_name, pre = parse_spec(name)
    rule = get(rule_name)
    check_sketch_hparams(rule, hparams)
    stack = _before_rule(rule, [(get_pre(n), {}) for n in pre], stack, f, key)
    return rule.update(stack, state, f=int(f), key=key, **hparams)
