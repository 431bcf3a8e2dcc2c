"""Shared machinery of the experiment scripts: run a grid of (setting, rule, seed) training runs — each
cell's seeds (and a script's grid) trained as ONE compiled program by ``flagjax.train.train_and_evaluate``
—, keep every run's JSON-lines log in the experiment's compact store (``<out>/runs.jsonl.gz``, one
line per run: its config, device, time and metrics history), and write a markdown table (mean ± std
over seeds) and a plot, both headed by the exact command that produced them. Scripts in this folder
only declare their grids. A run already in the store is never trained again: re-running a script
rebuilds its report from the store.

Every script takes ``--quick`` (synthetic data, a few steps: what CI runs), ``--paper`` (the paper's
CIFAR-10 / ResNet-18 setting from ``configs/cifar10_resnet18.py``), ``--seeds N``,
``--steps N``, ``--out DIR`` (default ``experiments/results/<name>``) and ``field=value`` overrides.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import io
import json
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from flagjax import train

RESULTS = Path(__file__).resolve().parent / "results"

# The CPU-sized default of every experiment: real Fashion-MNIST, the paper's CNN, 15 workers, f = 3.
BASE = dict(
    dataset="fashion_mnist",
    model="cnn",
    num_workers=15,
    num_byzantine=3,
    attack="random",
    batch_size=32,
    steps=200,
    lr=0.05,
    eval_every=50,
    log_every=20,
)
# The paper's own setting (CIFAR-10 via TFDS, ResNet-18, batch 128, 15 workers; for users with a network
# and a GPU/TPU): ``--paper`` starts every script from this config file instead of BASE.
PAPER_CONFIG = Path(__file__).resolve().parent / "configs" / "cifar10_resnet18.py"
QUICK = dict(dataset="synthetic", steps=4, eval_every=4, log_every=2, eval_examples=200, batch_size=8)

CLASSIC = ("mean", "median", "trimmed_mean", "meamed", "phocas", "multi_krum", "bulyan")


@dataclasses.dataclass
class Cell:
    """One table cell: a row label, a column label and the config overrides that define it."""

    row: str
    col: str
    overrides: dict


def parse_args(name: str, description: str, argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=f"python -m experiments.{name}", description=description)
    ap.add_argument("--quick", action="store_true", help="synthetic data, a few steps (CI smoke run)")
    ap.add_argument(
        "--paper",
        action="store_true",
        help="the paper's setting (experiments/configs/cifar10_resnet18.py: CIFAR-10 via TFDS, ResNet-18, "
        "batch 128) instead of the CPU-sized Fashion-MNIST default; needs TFDS data and a GPU/TPU in practice",
    )
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=None, help="override the steps per run")
    ap.add_argument("--out", default=None, help=f"output folder (default experiments/results/{name})")
    ap.add_argument("--rows", default="", help="comma-separated subset of table rows to run (default all)")
    ap.add_argument("--cols", default="", help="comma-separated subset of table columns to run (default all)")
    ap.add_argument(
        "--batch",
        choices=("auto", "on", "off"),
        default="auto",
        help="train a cell's seeds as one program (auto: on GPU/TPU, off on CPU, where it measured slower)",
    )
    ap.add_argument("overrides", nargs="*", help="field=value overrides applied to every run")
    # intermixed: field=value overrides may stand before, between or after the flags
    args = ap.parse_intermixed_args(argv)
    args.name = name
    args.argv = list(sys.argv[1:] if argv is None else argv)
    suffix = ("_paper" if args.paper else "") + ("_quick" if args.quick else "")
    args.out = Path(args.out) if args.out else RESULTS / (name + suffix)
    return args


def base_config(args, **extra) -> train.TrainConfig:
    """The script's base config: BASE (or, with ``--paper``, the paper-setting config file with its
    rule and output folder dropped), then the script's ``extra`` fields, ``--quick``, ``--steps`` and
    the command line's ``field=value`` overrides, in that order."""
    if getattr(args, "paper", False):
        paper = dataclasses.asdict(train.load_config(str(PAPER_CONFIG)))
        fields = {k: v for k, v in paper.items() if k not in ("rule", "out_dir")}
    else:
        fields = dict(BASE)
    fields.update(extra)
    if args.quick:
        fields.update(QUICK)
    if args.steps:
        fields["steps"] = args.steps
        fields["eval_every"] = min(fields["eval_every"], args.steps)
    cfg = train.TrainConfig(**fields)
    return train.apply_overrides(cfg, args.overrides)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def select(args, attr: str, labels: Sequence[str]) -> list[str]:
    """The ``labels`` (row or column labels, ``attr`` = "row" / "col") picked by ``--rows`` / ``--cols``, in
    order; all of them when the flag is empty. An unknown label exits with the list of known ones."""
    known = list(dict.fromkeys(labels))
    wanted = [w for w in getattr(args, attr + "s", "").split(",") if w]
    if not wanted:
        return known
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise SystemExit(f"--{attr}s: unknown {unknown}; this script's {attr}s are {known}")
    return [k for k in known if k in wanted]


class RunStore:
    """An experiment's runs in one compressed JSON-lines file (``<out>/runs.jsonl.gz``).

    Each line is ``{"id": ..., ...}``: a training run (``meta``: config, layout, seconds, device, runs
    in its program; ``history``: its metrics lines) or a cached result (``json``). Lines are sorted by
    id (each keeps its keys in the order written) and the gzip header carries no time stamp, so the
    same runs give the same bytes."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._rows: dict[str, dict] = {}
        if self.path.exists():
            with gzip.open(self.path, "rt", encoding="utf-8") as fh:
                for line in fh:
                    if line.strip():
                        row = json.loads(line)
                        self._rows[row["id"]] = row

    def __contains__(self, run_id: str) -> bool:
        return run_id in self._rows

    def __len__(self) -> int:
        return len(self._rows)

    def ids(self) -> list[str]:
        return sorted(self._rows)

    def get(self, run_id: str) -> dict | None:
        return self._rows.get(run_id)

    def put(self, run_id: str, row: dict, *, save: bool = True) -> None:
        self._rows[run_id] = {"id": run_id, **row}
        if save:
            self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps(self._rows[k]) + "\n" for k in sorted(self._rows))
        buf = io.BytesIO()
        with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, filename="") as gz:
            gz.write(text.encode("utf-8"))
        tmp = self.path.with_suffix(".tmp")
        tmp.write_bytes(buf.getvalue())
        tmp.replace(self.path)

    def cached(self, run_id: str, compute: Callable[[], object]):
        """``compute()``'s JSON-able result, stored under ``run_id`` on first call, read back afterwards."""
        if run_id not in self._rows:
            _refuse_training_if_read_only(self.path, [run_id])
            self.put(run_id, {"json": compute()})
        return self._rows[run_id]["json"]


READ_ONLY_ENV = "FLAGJAX_EXPERIMENTS_READ_ONLY"


def _refuse_training_if_read_only(path: Path, missing: list[str]) -> None:
    """With FLAGJAX_EXPERIMENTS_READ_ONLY=1 (scripts/rebuild_reports.sh) a report must rebuild from the
    store alone: a missing run is an error instead of hours of training."""
    import os

    if missing and os.environ.get(READ_ONLY_ENV):
        raise SystemExit(f"{READ_ONLY_ENV} is set and {path} lacks {missing[:5]} ({len(missing)} missing)")


def store(args) -> RunStore:
    """The experiment's :class:`RunStore` (``<out>/runs.jsonl.gz``)."""
    return RunStore(args.out / "runs.jsonl.gz")


def _record(row: str, col: str, seed: int, hist: list[dict], device: str | None, **extra) -> dict:
    fin = hist[-1]
    return {
        "row": row,
        "col": col,
        "seed": seed,
        "test_accuracy": fin.get("test_accuracy"),
        "val_accuracy": fin.get("val_accuracy"),
        "loss": fin["loss"],
        "wall_time": fin["wall_time"],
        "steps": fin["step"],
        "device": device or UNRECORDED_DEVICE,
        "history": hist,
        **extra,
    }


def train_batch(cfg: train.TrainConfig) -> tuple[list[train.RunResult], dict]:
    """Train every run of ``cfg`` (batch axes as ``train.Values``) as one program in a scratch folder;
    return the results and the metadata every run shares (layout, seconds, device)."""
    with tempfile.TemporaryDirectory(prefix="flagjax-exp-") as tmp:
        t0 = time.time()
        results = train.train_and_evaluate(cfg, tmp)
        seconds = time.time() - t0
    meta = {"layout": results[0].layout, "seconds": seconds, "device": device_name()}
    return results, meta


def batch_seeds(args) -> bool:
    """Whether a cell's seeds train as one program: ``--batch on|off|auto``; auto = on GPU/TPU only. On the
    2-core CPU a 3-seed batch of the main config took 1.31x the time of three separate runs
    (benchmarks/results/batch_runs.md), so there each seed is its own program."""
    import jax

    choice = getattr(args, "batch", "auto")
    return choice == "on" or (choice == "auto" and jax.default_backend() != "cpu")


def _stale(row: dict, overrides: dict) -> bool:
    """Whether a stored run was trained with other values of the cell's own ``overrides`` than the cell has
    now (its ``meta.config`` records them): such a run belongs to another experiment and is trained again.
    Runs stored without a config, fields the stored config lacks and batch axes (:class:`train.Values`) are
    not compared."""
    cfg = row.get("meta", {}).get("config")
    if not cfg:
        return False

    def norm(v):
        return json.loads(json.dumps(v, default=list))

    return any(k in cfg and not isinstance(v, train.Values) and norm(cfg[k]) != norm(v) for k, v in overrides.items())


def run_cells(args, cells: Sequence[Cell], base: train.TrainConfig, *, progress=True, batch=None) -> list[dict]:
    """Run every cell for seeds 0..N-1 (runs already in the store are read back, unless they were trained with
    other values of the cell's overrides: :func:`_stale`); return one record per run.

    With ``batch`` (default: :func:`batch_seeds`) a cell's missing seeds train as one program; ``batch=False`` trains
    them one program each (for scripts that report wall time or time per step: the runs of a batch share
    one clock, so their ``wall_time`` / ``step_time`` are the batch's; ``meta.runs_in_program`` says so)."""
    from tqdm import tqdm

    for attr in ("row", "col"):
        chosen = set(select(args, attr, [getattr(c, attr) for c in cells]))
        cells = [c for c in cells if getattr(c, attr) in chosen]
    if args.quick:  # smoke run: the first and the last cell (each cell compiles its own training step)
        cells = list(cells)
        cells = cells[:1] + cells[1:][-1:]
    runs = store(args)
    batch = batch_seeds(args) if batch is None else batch
    records = []
    bar = tqdm(cells, desc=args.name, unit="cell", file=sys.stderr, disable=not progress)
    for cell in bar:
        bar.set_postfix_str(f"{cell.row} | {cell.col}")
        ids = {seed: _slug(f"{cell.row}__{cell.col}__s{seed}") for seed in range(args.seeds)}
        missing = [s for s, run_id in ids.items() if run_id not in runs or _stale(runs.get(run_id), cell.overrides)]
        _refuse_training_if_read_only(runs.path, [ids[s] for s in missing])
        cfg = train.apply_overrides(base, [])
        for k, v in cell.overrides.items():
            setattr(cfg, k, v)
        for group in [missing] if batch else [[s] for s in missing]:
            if not group:
                continue
            cfg.seed = train.Values(group) if len(group) > 1 else group[0]
            results, meta = train_batch(cfg)
            for res in results:
                run_meta = {**meta, "runs_in_program": res.runs_in_program, "config": dataclasses.asdict(res.config)}
                runs.put(ids[res.config.seed], {"meta": run_meta, "history": res.history}, save=False)
            runs.save()
        for seed, run_id in ids.items():
            row = runs.get(run_id)
            records.append(_record(cell.row, cell.col, seed, row["history"], row["meta"].get("device")))
    return records


def capture_gradients(base: train.TrainConfig, steps: int) -> np.ndarray:
    """(p, d) honest per-worker gradients (float32) at step ``steps`` of a run of ``base`` (meant to be
    mean-aggregated without attackers): train ``steps`` steps, then each worker's gradient on its own
    batch of the next step, at the trained parameters."""
    su = train.setup(base)
    state = su.state
    for s in range(steps):
        state, _ = su.step(state, *su.batch(s))
    x, y = su.batch(steps)
    params = jax.tree.map(lambda a: a[0], state.params)

    def loss(prm, xb, yb):
        logits = su.model.apply({"params": prm}, xb)
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    grads = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(params, x[0], y[0])
    return np.asarray(jax.vmap(lambda g: ravel_pytree(g)[0])(grads))


# runs logged before run.json recorded the device were all made on the project's 2-core CPU machine
UNRECORDED_DEVICE = "cpu (not recorded: runs before the device field, all on the 2-core CPU machine)"


def device_name() -> str:
    """'<backend>: <device kind> x <count>, <n> host cores', e.g. 'gpu: NVIDIA H200 x 1, 16 host cores'."""
    import os

    import jax

    devs = jax.devices()
    return f"{jax.default_backend()}: {devs[0].device_kind} x {len(devs)}, {os.cpu_count()} host cores"


def command(args) -> str:
    return "python -m experiments." + args.name + " " + " ".join(shlex.quote(a) for a in args.argv)


def _cells(records: list[dict], value: str):
    """(rows, cols, {(row, col): non-None values}) in first-seen order."""
    rows = list(dict.fromkeys(r["row"] for r in records))
    cols = list(dict.fromkeys(r["col"] for r in records))
    vals: dict[tuple[str, str], list[float]] = {}
    for r in records:
        if r.get(value) is not None:
            vals.setdefault((r["row"], r["col"]), []).append(r[value])
    return rows, cols, vals


def table(records: list[dict], *, value="test_accuracy", fmt="{:.3f}", worst_case=False) -> str:
    """Markdown table: rows x columns of mean ± std over seeds (optionally a worst-case column)."""
    rows, cols, cell = _cells(records, value)
    head = "| | " + " | ".join(cols) + (" | worst case |" if worst_case else " |")
    lines = [head, "|---" * (len(cols) + 1 + worst_case) + "|"]
    for row in rows:
        vals, means = [], []
        for col in cols:
            v = cell.get((row, col), [])
            if not v:
                vals.append("—")
                continue
            m, s = float(np.mean(v)), float(np.std(v))
            means.append(m)
            vals.append(fmt.format(m) + (f" ± {fmt.format(s)}" if len(v) > 1 else ""))
        extra = [fmt.format(min(means))] if worst_case and means else []
        lines.append(f"| {row} | " + " | ".join(vals + extra) + " |")
    return "\n".join(lines)


def write_report(args, title: str, body: str, records: list[dict], notes: str = "") -> Path:
    """Write ``<out>/README.md`` (command, setting, tables) and ``<out>/records.json``."""
    args.out.mkdir(parents=True, exist_ok=True)
    seeds = sorted({r["seed"] for r in records})
    devices = sorted({r.get("device") or UNRECORDED_DEVICE for r in records})
    text = (
        f"# {title}\n\nProduced by:\n\n    {command(args)}\n\n"
        f"Ran on: {'; '.join(devices)}.\n\n"
        f"{len(records)} runs, seeds {seeds}"
        f"{' (QUICK smoke run on synthetic data: not a result)' if args.quick else ''}."
        f" Values: final test accuracy, mean ± std over seeds.\n\n{body}\n"
    )
    if notes:
        text += f"\n{notes}\n"
    (args.out / "README.md").write_text(text)
    slim = [{k: v for k, v in r.items() if k != "history"} for r in records]
    (args.out / "records.json").write_text(json.dumps(slim, indent=1))
    return args.out / "README.md"


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (scripts run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(args, fig, path_name: str) -> Path:
    """Lay out, write ``<out>/<path_name>`` at 120 dpi, close the figure, return the path."""
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / path_name
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    return path


def plot_curves(args, records: list[dict], path_name: str, *, group: Callable[[dict], str], title: str, x="step"):
    """Test accuracy (mean over seeds) against ``x`` ("step" or "wall_time") per group."""
    plt = pyplot()
    curves: dict[str, dict[float, list[float]]] = {}
    for r in records:
        g = group(r)
        for h in r["history"]:
            if "test_accuracy" in h:
                curves.setdefault(g, {}).setdefault(h["step"], []).append((h[x], h["test_accuracy"]))
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for g, pts in curves.items():
        steps = sorted(pts)
        xs = [np.mean([p[0] for p in pts[s]]) for s in steps]
        ys = [np.mean([p[1] for p in pts[s]]) for s in steps]
        ax.plot(xs, ys, marker="o", ms=3, label=g)
    ax.set_xlabel("wall time (s)" if x == "wall_time" else "step")
    ax.set_ylabel("test accuracy")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(args, fig, path_name)


def batch_runs(base: train.TrainConfig, axes: dict[str, Sequence], *, label: Callable[[dict], str]) -> list[dict]:
    """Train the product of ``axes`` as ONE program (``train.train_and_evaluate``) and return one record
    per run. Keys of ``axes``: config fields that may take several values (``seed``, ``lr``, ...) and
    ``lam`` (FA's λ, ``rule_hparams.lam``). Every run has its own data order, initialisation, keys and
    evaluation (test, and validation when ``val_fraction > 0``), as if trained alone. ``label(g)`` names
    a run from its values ``g`` (e.g. ``{"seed": 0, "lam": 1.0}``), which the record also carries."""
    cfg = train.apply_overrides(base, [])
    for key, values in axes.items():
        if key == "lam":
            cfg.rule_hparams["lam"] = train.Values(values)
        else:
            setattr(cfg, key, train.Values(values))
    results, meta = train_batch(cfg)
    recs = []
    for res in results:
        g = {k: (res.config.rule_hparams["lam"] if k == "lam" else getattr(res.config, k)) for k in axes}
        extra = {k: v for k, v in g.items() if k != "seed"}
        seed = g.get("seed", res.config.seed)
        recs.append(_record(label(g), "accuracy", seed, res.history, meta["device"], **extra))
    return recs


def plot_bars(args, records: list[dict], path_name: str, *, title: str, value="test_accuracy", ylabel=None):
    """Grouped bar chart of ``value`` (mean over seeds, std as error bars): one group per column, one bar
    per row; cells without runs are left empty."""
    plt = pyplot()
    rows, cols, vals = _cells(records, value)
    width = 0.8 / max(len(rows), 1)
    fig, ax = plt.subplots(figsize=(max(6.5, 1.1 * len(cols) + 0.25 * len(rows) * len(cols)), 4))
    for i, row in enumerate(rows):
        xs, ms, ss = [], [], []
        for j, col in enumerate(cols):
            v = vals.get((row, col))
            if v:
                xs.append(j - 0.4 + (i + 0.5) * width)
                ms.append(float(np.mean(v)))
                ss.append(float(np.std(v)) if len(v) > 1 else 0.0)
        ax.bar(xs, ms, width, yerr=ss, label=row, capsize=2)
    ax.set_xticks(range(len(cols)), cols, fontsize=8)
    ax.set_ylabel(ylabel or value.replace("_", " "))
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, ncol=2)
    return save_figure(args, fig, path_name)


def accuracy_and_step_time(args, records: list[dict], title: str, *, log_every: int, fmt: str = "{:.1f}") -> str:
    """The body of a report on accuracy and time per step: each record gets ``ms_per_step`` (the median
    of its blocked step times, logged every ``log_every`` steps), then the accuracy table, the time table
    and a bar plot of each (``accuracy.png``, ``ms_per_step.png``)."""
    for r in records:
        r["ms_per_step"] = 1e3 * float(np.median([h["step_time"] for h in r["history"] if "step_time" in h]))
    acc = plot_bars(args, records, "accuracy.png", title=title)
    ms = plot_bars(args, records, "ms_per_step.png", title=title, value="ms_per_step", ylabel="ms per step")
    return (
        table(records)
        + f"\n\nTime per training step (ms; per run the median of the step times logged every {log_every} steps, "
        "each blocked on the result; compilation and evaluation excluded):\n\n"
        + table(records, value="ms_per_step", fmt=fmt)
        + f"\n\n![accuracy]({acc.name})\n\n![time per step]({ms.name})"
    )


def plot_heatmap(args, records: list[dict], path_name: str, *, title: str, value="test_accuracy"):
    """Rows x columns heatmap of ``value`` (mean over seeds) with a worst-case column, numbers printed."""
    plt = pyplot()
    rows, cols, vals = _cells(records, value)
    grid = np.full((len(rows), len(cols) + 1), np.nan)
    for i, row in enumerate(rows):
        for j, col in enumerate(cols):
            if vals.get((row, col)):
                grid[i, j] = np.mean(vals[(row, col)])
        if np.isfinite(grid[i, :-1]).any():
            grid[i, -1] = np.nanmin(grid[i, :-1])
    fig, ax = plt.subplots(figsize=(1.0 * len(cols) + 3.5, 0.45 * len(rows) + 1.5))
    im = ax.imshow(grid, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    for (i, j), v in np.ndenumerate(grid):
        if np.isfinite(v):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.6 else "k")
    ax.set_xticks(range(len(cols) + 1), [*cols, "worst case"], rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label=value.replace("_", " "))
    return save_figure(args, fig, path_name)
