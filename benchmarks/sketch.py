"""Many workers: the sketched Gram matrix against the exact one, and a cost model checked against it.

Usage:
    python benchmarks/sketch.py [--quick] [--out benchmarks/results/sketch.md]

Targets (issue #18), each a ratio of timings taken in the same run (median of repeats, setups timed
round-robin so that drift favours none):

* p = 256, d = 2e5: FA with ``sketch=1024`` <= 10x the mean, reported beside exact FA and Multi-Krum
  (exact and sketched), with the time split into the sketch pass, FA's p x p solve and the combination.
* p = 1024, d = 1e6 (a 3.8 GiB float32 stack): FA with ``sketch=4096`` runs on this machine; its time
  against the mean's (exact FA there is a 2e12-flop Gram product: not timed).

The cost model gives flops, bytes read and bytes communicated per device for the exact and the
sketched Gram matrix in the server layout (every device aggregates the whole gathered stack) and the
sharded layout (n devices each hold d / n columns and psum a p x p Gram matrix, or p x k sketches),
plus FA's p x p solve and the combination. Its time prediction, flops / F + bytes / B with F and B
measured here (a large matmul and the mean's pass), is set beside the measured points: one device,
and 8 simulated CPU devices (a subprocess with ``--xla_force_host_platform_device_count=8``; they share
this machine's cores, so their prediction is the machine's total work at the same F and B).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

import _report  # benchmarks/_report.py (the script's folder is on sys.path)
import jax
import jax.numpy as jnp
from _timing import round_robin  # benchmarks/_timing.py

import flagjax
from flagjax import aggregators, sketch, solver

HERE = os.path.dirname(os.path.abspath(__file__))
BYTES = 4  # float32
T_SOLVE = solver.START_ITERS + 10 * solver.INNER_ITERS  # subspace iterations of FA's default solve


# ------------------------------------------------------------------------------------------ cost model
def cost(p: int, d: float, k: int, n: int, layout: str, sketched: bool) -> dict:
    """Per-device work of forming the (exact or sketched) Gram matrix on n devices.

    exact, server: 2 p^2 d flops, p d floats read; sharded: 2 p^2 d / n flops, p d / n read, a psum of
    p^2 floats (ring all-reduce: 2 (n - 1) / n of it sent). sketched: about 4 flops per entry (sign,
    add, square, add; the hash is per column) over the same entries, then 2 p^2 k for S S^T; the psum
    carries p (k + 1) floats."""
    share = 1 if layout == "server" else n
    entries = p * d / share
    if sketched:
        flops = 4 * entries + 2 * p * p * k
        comm = 0 if layout == "server" or n == 1 else 2 * (n - 1) / n * p * (k + 1) * BYTES
    else:
        flops = 2 * p * entries
        comm = 0 if layout == "server" or n == 1 else 2 * (n - 1) / n * p * p * BYTES
    return {"flops": flops, "bytes": entries * BYTES, "comm": comm}


def solve_flops(p: int) -> float:
    """FA's default p x p solve: T_SOLVE subspace iterations, each K (W V) (2 p^2 r) and about 10 p r^2
    for the Cholesky-QR passes in the K metric; r = ceil((p + 1) / 2)."""
    r = aggregators.default_rank(p)
    return T_SOLVE * (2 * p * p * r + 10 * p * r * r)


def predict_ms(flops: float, nbytes: float, F: float, B: float) -> float:
    return 1e3 * (flops / F + nbytes / B)


# ------------------------------------------------------------------------------------------ timing
def stack(p: int, d: int, seed: int = 0) -> jax.Array:
    """A (p, d) float32 stack of correlated rows (a shared direction plus noise), made on the device."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    return jax.random.normal(k1, (1, d)) + jax.random.normal(k2, (p, d))


def calibrate(repeats: int) -> tuple[float, float]:
    """(F flop/s of a 2048^3 float32 matmul, B bytes/s of the mean of a (64, 4e6) stack) on this device."""
    a = jax.random.normal(jax.random.key(0), (2048, 2048))
    mm = jax.jit(lambda a: a @ a)
    t_mm = round_robin({"mm": mm}, (a,), repeats)["mm"] / 1e3
    g = jax.random.normal(jax.random.key(1), (64, 4_000_000))
    mean = jax.jit(lambda g: jnp.ones((64,)) @ g / 64)
    t_mean = round_robin({"mean": mean}, (g,), repeats)["mean"] / 1e3
    return 2 * 2048**3 / t_mm, 64 * 4e6 * BYTES / t_mean


def cosine(a, b) -> float:
    return float(jnp.dot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))


def time_target(p: int, d: int, k: int, *, exact: bool, repeats: int) -> dict:
    """Round-robin times of the mean, FA and Multi-Krum (sketched, and exact when ``exact``; FA with
    r = 64 when not), the Gram matrix or sketch alone, then FA's p x p solve alone on the sketched Gram
    matrix; with ``exact``, also the cosine of sketched FA's output to exact FA's."""
    f = p // 5
    G = stack(p, d)
    key = jax.random.key(0)
    seed = sketch.seed_from_key(key)
    # the key is an argument, as in a training step (the sketch's seed is drawn from the round's key at
    # run time): a key fixed when tracing would let XLA hash every sign while compiling
    agg = lambda rule, **hp: jax.jit(lambda g, key: flagjax.aggregate(rule, g, f=f, key=key, **hp))  # noqa: E731
    fns = {"mean": agg("mean")}
    if exact:
        fns["FA exact"] = agg("flag")
    fns[f"FA sketch={k}"] = agg("flag", sketch=k)
    if not exact:
        fns[f"FA sketch={k}, r=64"] = agg("flag", sketch=k, r=64)
    if exact:
        fns["Multi-Krum exact"] = agg("multi_krum")
    fns[f"Multi-Krum sketch={k}"] = agg("multi_krum", sketch=k)
    if exact:
        fns["exact Gram alone"] = jax.jit(lambda g, key: solver.gram_matrix(g))
    fns[f"sketch + norms alone (k={k})"] = jax.jit(
        lambda g, key: sketch.sketch_and_norms(g, k, seed=sketch.seed_from_key(key))
    )
    t = round_robin(fns, (G, key), repeats)
    info = aggregators.basic.sketched_gram_info(G, k, seed=seed)
    r = aggregators.default_rank(p)
    solve = jax.jit(lambda K, v: solver.solve_gram(K, v, r=r, pairwise=False)[0])
    name = "FA's p x p solve alone" if exact else f"FA's p x p solve alone (r={r})"
    t[name] = round_robin({"s": solve}, (info.K, info.valid), repeats if exact else max(3, repeats // 2))["s"]
    out = {"p": p, "d": d, "k": k, "ms": t}
    if exact:
        out["fa_cosine"] = cosine(fns["FA exact"](G, key), fns[f"FA sketch={k}"](G, key))
    return out


def target_p256(quick: bool, repeats: int) -> dict:
    """p = 256, d = 2e5, k = 1024 (the FA <= 10x the mean target), exact rules beside."""
    return time_target(*((64, 50_000, 256) if quick else (256, 200_000, 1024)), exact=True, repeats=repeats)


def target_p1024(quick: bool, repeats: int) -> dict:
    """p = 1024, d = 1e6, k = 4096 (runs on this machine; exact FA not timed)."""
    return time_target(*((256, 200_000, 1024) if quick else (1024, 1_000_000, 4096)), exact=False, repeats=repeats)


def sharded_points(quick: bool, repeats: int) -> dict:
    """Run in a subprocess with 8 simulated devices: the sharded layout's Gram / sketch, psum included."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    n = jax.device_count()
    p, d, k = (64, 50_000, 256) if quick else (256, 200_000, 1024)
    d -= d % n
    mesh = jax.make_mesh((n,), ("w",), axis_types=(jax.sharding.AxisType.Explicit,))
    G = jax.device_put(stack(p, d), NamedSharding(mesh, P(None, "w")))

    def exact(g):
        return jax.lax.psum(solver.gram_matrix(g), "w")

    def sk(g):
        off = jax.lax.axis_index("w") * g.shape[1]
        S, n2 = jax.lax.psum(sketch.sketch_and_norms(g, k, seed=3, offset=off), "w")
        return sketch.sketch_gram_from_parts(S, n2)

    wrap = lambda fn: jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=P(None, "w"), out_specs=P(), check_vma=False))  # noqa: E731
    t = round_robin({"exact": wrap(exact), "sketch": wrap(sk)}, (G,), repeats)
    F, B = calibrate(repeats)
    return {"n": n, "p": p, "d": d, "k": k, "ms": t, "F": F, "B": B}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (the test suite)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--sharded-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    repeats = 3 if args.quick else 7
    if args.sharded_only:
        print(json.dumps(sharded_points(args.quick, repeats)))
        return None
    F, B = calibrate(repeats)
    print(f"calibration: F = {F / 1e9:.1f} GFLOP/s, B = {B / 1e9:.2f} GB/s", flush=True)
    a = target_p256(args.quick, repeats)
    print("p256", json.dumps(a["ms"]), f"cos {a['fa_cosine']:.4f}", flush=True)
    b = target_p1024(args.quick, max(3, repeats // 2))
    print("p1024", json.dumps(b["ms"]), flush=True)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    cmd = [sys.executable, os.path.join(HERE, "sketch.py"), "--sharded-only"] + (["--quick"] if args.quick else [])
    sh = json.loads(
        subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    )
    print("sharded", json.dumps(sh["ms"]), flush=True)
    text = report(args, F, B, a, b, sh)
    print(text)
    _report.save(text, args.out)
    return text


def _timing_table(res: dict, what: str, fmt: str) -> list[str]:
    """A section heading and the table of one :func:`time_target` result (ms and x the mean)."""
    t, mean = res["ms"], res["ms"]["mean"]
    return [
        f"## p = {res['p']}, d = {res['d']:.0e}, sketch = {res['k']} ({what})",
        "",
        "| setup | ms | x mean |",
        "|---|---|---|",
        *[f"| {name} | {fmt.format(ms)} | {ms / mean:.2f} |" for name, ms in t.items()],
    ]


def report(args, F, B, a, b, sh) -> str:
    cmd = (
        "python benchmarks/sketch.py" + (" --quick" if args.quick else "") + (f" --out {args.out}" if args.out else "")
    )
    dev = jax.devices()[0]
    L = [
        "# Many workers: the sketched Gram matrix"
        + (" (QUICK: small sizes, the targets do not apply)" if args.quick else ""),
        "",
        f"Produced by `{cmd}` on {platform.machine()} with {os.cpu_count()} CPU cores, JAX {jax.__version__} "
        f"({dev.platform}: {dev.device_kind}). Median ms of repeats, setups timed round-robin. Calibration: "
        f"F = {F / 1e9:.1f} GFLOP/s (2048^3 float32 matmul), B = {B / 1e9:.2f} GB/s (the mean of a (64, 4e6) stack).",
        "",
    ]
    t = a["ms"]
    k = a["k"]
    mean = t["mean"]
    fa = t[f"FA sketch={k}"]
    L += [
        *_timing_table(a, "target: FA sketched <= 10x the mean", "{:.2f}"),
        "",
        f"FA sketched / mean = **{fa / mean:.2f}**"
        + ("" if args.quick else f" (target <= 10: {'met' if fa / mean <= 10 else 'missed'})")
        + "; "
        f"exact FA / mean = {t['FA exact'] / mean:.1f}. Output cosine of sketched FA to exact FA on this "
        f"synthetic stack: {a['fa_cosine']:.4f} (the >= 0.98 target is on real gradients: experiments/results/scale).",
        "",
    ]
    L += [
        *_timing_table(b, "target: runs; time against the mean's", "{:.1f}"),
        "",
        "Exact FA at this size is a 2e12-flop Gram product (about a minute here): not timed.",
        "",
    ]
    # model against measurement
    rows = []
    p, d, k = a["p"], a["d"], a["k"]
    ce, cs = cost(p, d, k, 1, "server", False), cost(p, d, k, 1, "server", True)
    rows.append(
        ("exact Gram, 1 device", p, d, k, predict_ms(ce["flops"], ce["bytes"], F, B), a["ms"]["exact Gram alone"])
    )
    rows.append(
        (
            "sketch + norms, 1 device",
            p,
            d,
            k,
            predict_ms(cs["flops"] - 2 * p * p * k, cs["bytes"], F, B),
            a["ms"][f"sketch + norms alone (k={k})"],
        )
    )
    rows.append(("FA solve", p, "-", "-", predict_ms(solve_flops(p), 0, F, B), a["ms"]["FA's p x p solve alone"]))
    p2, d2, k2 = b["p"], b["d"], b["k"]
    cs2 = cost(p2, d2, k2, 1, "server", True)
    rows.append(
        (
            "sketch + norms, 1 device",
            p2,
            d2,
            k2,
            predict_ms(cs2["flops"] - 2 * p2 * p2 * k2, cs2["bytes"], F, B),
            b["ms"][f"sketch + norms alone (k={k2})"],
        )
    )
    solve_key = next(n for n in b["ms"] if n.startswith("FA's p x p solve"))
    rows.append(("FA solve", p2, "-", "-", predict_ms(solve_flops(p2), 0, F, B), b["ms"][solve_key]))
    n = sh["n"]
    for name, sk in (("exact", False), ("sketch", True)):
        c = cost(sh["p"], sh["d"], sh["k"], n, "sharded", sk)
        # n simulated devices share this machine: the machine's total work at its F and B
        pred = predict_ms(c["flops"] * n, c["bytes"] * n, sh["F"], sh["B"])
        rows.append(
            (
                f"{name} Gram, sharded, {n} simulated devices (psum included)",
                sh["p"],
                sh["d"],
                sh["k"],
                pred,
                sh["ms"][name],
            )
        )
    L += [
        "## The cost model against the measurements",
        "",
        "Prediction = flops / F + bytes / B (no latency, no overlap of the two).",
        "",
        "| what | p | d | k | model ms | measured ms | measured / model |",
        "|---|---|---|---|---|---|---|",
        *[f"| {w} | {p_} | {_fmt(d_)} | {k_} | {m:.2f} | {ms:.2f} | {ms / m:.1f} |" for w, p_, d_, k_, m, ms in rows],
        "",
    ]
    # the model's table
    n = 8
    L += [
        f"## The model at scale: per device, n = {n} devices, k = 4096, float32",
        "",
        "GFLOP of the Gram matrix (exact in the server and the sharded layout, sketched in the sharded one), of FA's "
        "p x p solve, GB read per device (sharded) and MB sent per device by the psum (exact p x p vs sketched p x k).",
        "",
        "| p | d | exact server GFLOP | exact sharded GFLOP | sketch sharded GFLOP | FA solve GFLOP | GB read "
        "| exact psum MB | sketch psum MB | exact / sketch flops |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in (15, 64, 256, 1024, 4096):
        for d in (1e5, 1e7, 1e9):
            k = 4096
            es, eh, sh_ = (
                cost(p, d, k, 1, "server", False),
                cost(p, d, k, n, "sharded", False),
                cost(p, d, k, n, "sharded", True),
            )
            cells = [es["flops"] / 1e9, eh["flops"] / 1e9, sh_["flops"] / 1e9, solve_flops(p) / 1e9, eh["bytes"] / 1e9]
            cells += [eh["comm"] / 1e6, sh_["comm"] / 1e6, eh["flops"] / sh_["flops"]]
            L.append(f"| {p} | {d:.0e} | " + " | ".join(f"{c:.3g}" for c in cells) + " |")
    L += [
        "",
        "Reading it: the sketch turns the Gram matrix's 2 p^2 d / n flops into about 4 p d / n + 2 p^2 k, so it pays "
        "once p is more than a few and d > k (and costs more than it saves at d = 1e5, p = 15); the psum carries p k "
        "floats instead of p^2, more when p < k. At p >= 1024 FA's p x p solve (cubic in p, independent of d) is "
        "the larger term unless d is large: a smaller r cuts it (r = 64 in the p = 1024 table above).",
        "",
    ]
    return "\n".join(L)


def _fmt(d):
    return d if isinstance(d, str) else f"{d:.0e}"


if __name__ == "__main__":
    main()
