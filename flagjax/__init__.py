"""flagjax: Byzantine-robust distributed training in JAX around the Flag Aggregator (ICLR 2024)."""

from flagjax import aggregators, attacks, solver
from flagjax.aggregators import aggregate
from flagjax.solver import FlagSolution, FlagStatus, flag_median

__version__ = "0.1.0"

__all__ = [
    "FlagSolution",
    "FlagStatus",
    "aggregate",
    "aggregators",
    "attacks",
    "flag_median",
    "solver",
    "__version__",
]
