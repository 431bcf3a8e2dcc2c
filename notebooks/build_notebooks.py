"""Writes notebooks/*.ipynb from the cell sources below (outputs stripped). Run after editing:

    python notebooks/build_notebooks.py

tests/test_notebooks.py executes both notebooks (FLAGJAX_NOTEBOOK_QUICK=1 keeps them small)."""

from pathlib import Path

import nbformat as nbf

HERE = Path(__file__).resolve().parent

SOLVER = [
    (
        "md",
        "# The flag-median solver at work\n\nToy gradients with outliers: where the mean, the coordinate-wise "
        "median, Krum and the Flag Aggregator (FA) land; IRLS objective traces and weights; how the pairwise "
        "weight λ and the rank r move the answer; the workers' ratios against the Beta(1, ½) model of the paper.",
    ),
    (
        "code",
        "import os\nimport numpy as np\nimport jax, jax.numpy as jnp\nimport matplotlib\nmatplotlib.use('Agg')\n"
        "import matplotlib.pyplot as plt\nimport flagjax\nfrom flagjax import aggregators\n\n"
        "QUICK = os.environ.get('FLAGJAX_NOTEBOOK_QUICK') == '1'\nrng = np.random.default_rng(0)",
    ),
    ("md", "## 1. Toy 3-D gradients: 12 honest around a direction, 3 colluding outliers"),
    (
        "code",
        "honest = np.array([1.0, 0.5, 0.2]) + 0.25 * rng.normal(size=(12, 3))\n"
        "outliers = np.array([-2.0, 3.0, 1.0]) + 0.05 * rng.normal(size=(3, 3))\n"
        "G = jnp.asarray(np.concatenate([honest, outliers]), jnp.float32)\n"
        "m = honest.mean(0)\n"
        "outs = {name: np.asarray(flagjax.aggregate(name, G, f=3, **kw)) for name, kw in [\n"
        "    ('mean', {}), ('median', {}), ('krum', {}), ('flag', {'r': 1}), ('flag', {'r': 2})][:5]}\n"
        "outs['flag r=1'] = np.asarray(flagjax.aggregate('flag', G, f=3, r=1))\n"
        "outs['flag r=2'] = np.asarray(flagjax.aggregate('flag', G, f=3, r=2))\n"
        "cos = lambda a, b: float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))\n"
        "for k, v in outs.items():\n    print(f'{k:10s} cosine to honest mean {cos(v, m):+.3f}')",
    ),
    (
        "code",
        "fig, ax = plt.subplots(figsize=(5, 4))\n"
        "ax.scatter(honest[:, 0], honest[:, 1], label='honest')\n"
        "ax.scatter(outliers[:, 0], outliers[:, 1], marker='x', label='Byzantine')\n"
        "for k, v in outs.items():\n"
        "    d = v / np.linalg.norm(v) * np.linalg.norm(m)\n"
        "    ax.arrow(0, 0, d[0], d[1], width=0.02, length_includes_head=True)\n"
        "    ax.annotate(k, d[:2])\n"
        "ax.set_title('directions (first two coordinates)'); ax.legend(); plt.show()",
    ),
    ("md", "## 2. IRLS: objective trace (non-increasing) and weights per step"),
    (
        "code",
        "# float64: near a fitted point sqrt(1 - v) turns float32 rounding of v (~1e-7) into ~3e-4 noise\n"
        "with jax.enable_x64(True):\n"
        "    G64 = jnp.asarray(np.asarray(G), jnp.float64)\n"
        "    sol = flagjax.flag_median(G64, 2, max_iters=15, tol=-np.inf, eps=1e-10)\n"
        "    trace = np.asarray(sol.trace)\n"
        "    W = np.stack([np.asarray(flagjax.flag_median(G64, 2, max_iters=k, tol=-np.inf, eps=1e-10).weights) for k in range(8)])\n"
        "print('objective per step:', np.round(trace, 6))\n"
        "assert np.all(np.diff(trace) <= 1e-5), 'majorise-minimise: non-increasing up to eps'\n"
        "fig, axes = plt.subplots(1, 2, figsize=(9, 3))\naxes[0].plot(trace, marker='o'); axes[0].set_title('A(Y_t)')\n"
        "axes[1].plot(W[:, :12], color='C0', alpha=.5); axes[1].plot(W[:, 12:], color='C3')\n"
        "axes[1].set_yscale('log'); axes[1].set_title('IRLS weights (red: Byzantine)'); plt.show()",
    ),
    ("md", "## 3. How λ and r move the answer (one vmapped call over λ)"),
    (
        "code",
        "lams = jnp.array([0., 1., 4., 16., 64.])\n"
        "aggs = jax.vmap(lambda lam: flagjax.aggregate('flag', G, f=3, r=2, lam=lam))(lams)\n"
        "for lam, a in zip(lams, np.asarray(aggs)):\n    print(f'lambda={float(lam):5.1f}  cosine {cos(a, m):+.3f}')\n"
        "for r in (1, 2, 3):\n    print(f'r={r}  cosine {cos(np.asarray(flagjax.aggregate(\"flag\", G, f=3, r=r)), m):+.3f}')",
    ),
    ("md", "## 4. Ratios under FA versus the Beta(1, ½) model"),
    (
        "code",
        "p = 30 if QUICK else 120\nd = 500\nH = rng.normal(size=d)[None] + rng.normal(size=(p, d))\n"
        "sol = flagjax.flag_median(jnp.asarray(H, jnp.float32), 8, max_iters=10)\n"
        "v = np.asarray(sol.ratios)\nx = np.linspace(0.01, 0.99, 99)\n"
        "beta_pdf = 0.5 * (1 - x) ** -0.5  # Beta(1, 1/2)\n"
        "plt.hist(v, bins=20, density=True, alpha=.6, label='FA ratios'); plt.plot(x, beta_pdf, label='Beta(1, ½)')\n"
        "plt.legend(); plt.xlabel('ratio'); plt.show()\nprint('mean ratio', v.mean())",
    ),
]

RESULTS = [
    (
        "md",
        "# Results: redraw the experiments' figures from their logs\n\nReads `experiments/results/*/records.json` "
        "and the per-run `metrics.jsonl` logs written by the scripts in `experiments/`.",
    ),
    (
        "code",
        "import json, os\nfrom pathlib import Path\nimport numpy as np\nimport matplotlib\nmatplotlib.use('Agg')\n"
        "import matplotlib.pyplot as plt\n\n"
        "root = Path(os.environ.get('FLAGJAX_RESULTS', Path.cwd().parent / 'experiments' / 'results'))\n"
        "if not root.exists():\n    root = Path('experiments/results')\n"
        "exps = sorted(p.parent for p in root.glob('*/records.json'))\nprint('experiments found:', [e.name for e in exps])",
    ),
    (
        "code",
        "def summary(exp):\n    recs = json.loads((exp / 'records.json').read_text())\n    cells = {}\n"
        "    for r in recs:\n        if r.get('test_accuracy') is not None:\n"
        "            cells.setdefault((r['row'], r['col']), []).append(r['test_accuracy'])\n"
        "    return {k: (np.mean(v), np.std(v), len(v)) for k, v in cells.items()}\n\n"
        "for exp in exps:\n    print(f'== {exp.name}')\n"
        "    for (row, col), (mu, sd, n) in sorted(summary(exp).items()):\n"
        "        print(f'  {row:28s} {col:24s} {mu:.3f} ± {sd:.3f} (n={n})')",
    ),
    (
        "code",
        "for exp in exps:\n    runs = sorted((exp / 'runs').glob('*/metrics.jsonl'))\n    if not runs:\n        continue\n"
        "    fig, ax = plt.subplots(figsize=(6, 3.5))\n    curves = {}\n    for path in runs:\n"
        "        label = path.parent.name.rsplit('__s', 1)[0]\n"
        "        pts = [(h['step'], h['test_accuracy']) for h in map(json.loads, path.read_text().splitlines()) if 'test_accuracy' in h]\n"
        "        for s, a in pts:\n            curves.setdefault(label, {}).setdefault(s, []).append(a)\n"
        "    for label, c in list(curves.items())[:12]:\n        steps = sorted(c)\n"
        "        ax.plot(steps, [np.mean(c[s]) for s in steps], label=label)\n"
        "    ax.set_title(exp.name); ax.set_xlabel('step'); ax.set_ylabel('test accuracy'); ax.legend(fontsize=6); plt.show()",
    ),
]


def build(cells, name):
    nb = nbf.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbf.v4.new_markdown_cell(s) if k == "md" else nbf.v4.new_code_cell(s) for k, s in cells]
    nbf.write(nb, HERE / f"{name}.ipynb")


if __name__ == "__main__":
    build(SOLVER, "solver_behaviour")
    build(RESULTS, "results")
