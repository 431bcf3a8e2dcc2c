"""Aggregation rules on a (p, d) stack of worker gradients, and the registry that names them.

Every rule is a pure function ``fn(stack, *, f, key, **hparams) -> (d,)`` on a (p, d) float array,
where ``f`` is the declared number of Byzantine workers and ``key`` a PRNG key (ignored by
deterministic rules). :func:`aggregate` is the front door: it accepts a (p, d) array or a pytree whose
leaves share the leading axis p, checks the arguments, applies optional pre-aggregators
(``pre=("nnm",)`` or the spec ``"nnm+krum"``) and returns the structure of the input without that axis.
Jit it with the rule name, ``f`` and structural hyperparameters (``r``, ``max_iters``, ``output``) static.

Modules: ``registry`` (front door), ``basic`` (mean, normalized_mean, flag), ``coordinatewise``
(median, trimmed_mean, meamed, phocas), ``distance`` (krum, multi_krum, bulyan, geomed,
centered_clipping, mda, monna), ``spectral`` (caf, smea, dnc, signguard), ``pre`` (nnm, bucketing,
arc, clip).
"""

from flagjax.aggregators import basic, coordinatewise, distance, pre, spectral
from flagjax.aggregators.basic import (
    FLAG_OUTPUTS,
    FlagInfo,
    FlagState,
    default_rank,
    flag,
    flag_coefficients,
    flag_with_info,
    mean,
    normalized_mean,
)
from flagjax.aggregators.distance import CenterState
from flagjax.aggregators.registry import (
    PRE_AGGREGATORS,
    RULES,
    PreAggregator,
    Rule,
    aggregate,
    aggregate_update,
    check_sketch_hparams,
    flatten_stack,
    get,
    get_pre,
    init_state,
    names,
    parse_spec,
    pre_names,
    register,
    register_pre,
    sanitize_rows,
    unregister,
)

__all__ = [
    "PRE_AGGREGATORS",
    "RULES",
    "aggregate_update",
    "init_state",
    "CenterState",
    "FLAG_OUTPUTS",
    "FlagInfo",
    "FlagState",
    "PreAggregator",
    "Rule",
    "aggregate",
    "basic",
    "check_sketch_hparams",
    "coordinatewise",
    "default_rank",
    "distance",
    "flag",
    "flag_coefficients",
    "flag_with_info",
    "flatten_stack",
    "get",
    "get_pre",
    "mean",
    "names",
    "normalized_mean",
    "parse_spec",
    "pre",
    "pre_names",
    "register",
    "register_pre",
    "sanitize_rows",
    "spectral",
    "unregister",
]
