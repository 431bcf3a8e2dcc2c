"""Smoke check of FA's default solver dispatch on a GPU: which solver runs, and whether it runs under
jit, vmap (a batch of stacks), a batch of training runs (train_and_evaluate with two seeds) and the
sharded layout. Prints one line per check; exits non-zero on the first failure.

Usage:
    python benchmarks/gpu_smoke.py [--method subspace]   (on CPU, ``--method pallas`` exercises the same
                                                           paths with the interpreted kernel)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import flagjax
from flagjax import data, train


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="subspace")
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args(argv)
    print("jax", jax.__version__, jax.devices(), flush=True)
    rng = np.random.default_rng(0)
    G = jnp.asarray(rng.normal(size=(15, 20_000)) + rng.normal(size=20_000), jnp.float32)
    m = args.method
    prims = str(jax.make_jaxpr(lambda g: flagjax.aggregate("flag", g, f=3, method=m))(G))
    print("pallas_call in the default's program:", "pallas_call" in prims, flush=True)
    a = jax.jit(lambda g: flagjax.aggregate("flag", g, f=3, method=m))(G)
    b = flagjax.aggregate("flag", G, f=3, method="subspace_xla")
    cos = float(a @ b / jnp.linalg.norm(a) / jnp.linalg.norm(b))
    print(f"jit: cosine to the XLA loop {cos:.6f}", flush=True)
    assert cos > 0.999, cos
    Gs = jnp.stack([G, G[::-1], 2 * G])
    batched = jax.jit(jax.vmap(lambda g: flagjax.aggregate("flag", g, f=3, method=m)))(Gs)
    assert bool(jnp.all(jnp.isfinite(batched))), "vmap: non-finite"
    print("vmap over 3 stacks: ok", flush=True)
    ds = data.synthetic_dataset(n_train=600, n_test=100)
    for layout, seeds in (("server", train.Values((0, 1))), ("sharded", 0)):
        cfg = train.TrainConfig(
            model="cnn",
            rule="flag",
            rule_hparams={"method": m},
            attack="random",
            num_workers=15,
            num_byzantine=3,
            batch_size=8,
            steps=args.steps,
            eval_every=args.steps,
            seed=seeds,
            layout=layout,
            num_devices=1,
            out_dir=tempfile.mkdtemp(),
        )
        t0 = time.time()
        res = train.train_and_evaluate(cfg, dataset=ds)
        accs = [r.final["test_accuracy"] for r in res]
        print(f"train_and_evaluate layout={layout} runs={len(res)}: {accs} ({time.time() - t0:.1f} s)", flush=True)
        assert all(np.isfinite(accs))
    print("all checks passed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
