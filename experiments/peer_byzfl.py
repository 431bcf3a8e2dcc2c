"""Head-to-head with ByzFL's own training framework: the same experiment trained by ByzFL's
``fed_framework`` (Client, ByzantineClient, Server / RobustAggregator; PyTorch on the CPU) and by flagjax,
with final test accuracy per cell and wall time per step for each library.

The setting is ByzFL's benchmark default (``byzfl/benchmark/benchmark.py``): 10 honest clients plus f
Byzantine ones, its ``cnn_mnist`` model (ported: ``flagjax.models.CnnMnist``, same parameter count and
initialisation scheme), batch 25 per client, server SGD with lr 0.1 and weight decay 1e-4, no server
momentum, client-side momentum 0.9 (each honest client sends m <- 0.9 m + 0.1 g: flagjax's
``worker_momentum``), NLL loss on log-softmax (= cross-entropy), 80 % of the training set used for
training (ByzFL's ``size_train_set``; flagjax: ``val_fraction=0.2``), iid split. Data: real
Fashion-MNIST from the Debian IDX files, pixels in [0, 1] on both sides (ByzFL feeds it as a torch
``TensorDataset``: nothing is downloaded, so ByzFL's random horizontal flips of Fashion-MNIST are not
applied; neither side augments). Attacks are ByzFL's SignFlipping, ALittleIsEnough (tau 1.5: mu + 1.5 sigma
with the sample deviation, flagjax's ``alie`` with ``z=-1.5, ddof=1``; flagjax's default, mu - z sigma with
the population deviation, pushes the other way: tests/test_byzfl_parity.py), and its optimal IPM / ALIE,
which search the attack's factor against the defence (flagjax's optimal attacks search a fixed grid of 32
factors, ByzFL's an expansion-contraction line search of 20 evaluations; both search t >= 0: IPM sends
-t mu, ALIE mu + t sigma with the sample deviation, flagjax's ``optimal_alie`` with ``direction=1, ddof=1``,
whose default, mu - t sigma with the population deviation, pushes the other way). Rules are
ByzFL's, with f given to each as its benchmark does; centered clipping is ByzFL's default (tau 100, one
iteration, centred on the previous aggregate: ByzFL's server keeps one aggregator object whose centre
``m`` is its last output); Multi-Krum uses ByzFL's n - f - 1 neighbours. flagjax adds FA and
normalized_mean (Fed-NGA with equal weights, Zuo et al. NeurIPS 2025).

Two known differences in the protocol, both iid and statistically the same: ByzFL splits the training
set over its 10 honest clients, flagjax over all 10 + f workers (the Byzantine workers' shards go unused
under these gradient attacks), so a flagjax worker walks a smaller shard; and each library draws its own
split, initial weights and batches from the seed.

Usage: python -m experiments.peer_byzfl [--quick] [--seeds N] [--steps N] [--attacks SF,ALIE] [--fs 3]
       [--gammas 1,0.5] [--rows ...] [--cols ...]

``--gammas``: the data splits, 1 = iid (the default) and g < 1 ByzFL's gamma-similarity split
(``gamma_similarity_niid``: a fraction g of the examples split iid, the rest sorted by label and cut into
contiguous parts), over the honest clients only on both sides (flagjax: ``shard="gamma"``,
``split_among="honest"``, so the Byzantine workers' shards take no labels away from the honest ones).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import statistics
import sys
import time

import numpy as np

from experiments import common
from flagjax import data, train
from flagjax.peers import byzfl_module

# attack label -> (flagjax attack, flagjax hparams, ByzFL attack class name). "optimal" attacks also get
# the defence (flagjax: attack_hparams.rule/rule_hparams; ByzFL: aggregator_info/pre_agg_list).
ATTACKS = {
    "SF": ("signflip", {}, "SignFlipping"),
    "ALIE": ("alie", {"z": -1.5, "ddof": 1}, "ALittleIsEnough"),  # ByzFL: mu + 1.5 sigma, sample sigma
    "opt-IPM": ("optimal_ipm", {}, "Optimal_InnerProductManipulation"),
    "opt-ALIE": ("optimal_alie", {"direction": 1, "ddof": 1}, "Optimal_ALittleIsEnough"),  # mu + t sigma
}


def _rules(p: int, f: int) -> dict:
    """rule label -> (flagjax rule spec, flagjax rule_hparams, ByzFL aggregator_info, ByzFL pre_agg_list)
    for p workers of which f Byzantine; None in the ByzFL slots: flagjax only."""
    mk = {"neighbours": p - f - 1}  # ByzFL's Krum scores sum n - f - 1 distances
    cc = {"tau": 100.0, "iters": 1, "center": "previous"}
    agg = lambda name, **kw: {"name": name, "parameters": kw}  # noqa: E731
    nnm = [{"name": "NNM", "parameters": {"f": f}}]
    return {
        "average": ("mean", {}, agg("Average"), []),
        "median": ("median", {}, agg("Median"), []),
        "trimmed mean": ("trimmed_mean", {}, agg("TrMean", f=f), []),
        "Multi-Krum": ("multi_krum", mk, agg("MultiKrum", f=f), []),
        "centered clipping": ("centered_clipping", cc, agg("CenteredClipping", L=1, tau=100.0), []),
        "NNM + trimmed mean": ("nnm+trimmed_mean", {}, agg("TrMean", f=f), nnm),
        "NNM + Multi-Krum": ("nnm+multi_krum", mk, agg("MultiKrum", f=f), nnm),
        "FA (flagjax only)": ("flag", {}, None, None),
        "normalized_mean (flagjax only)": ("normalized_mean", {}, None, None),
    }


ROWS = tuple(_rules(13, 3))
BYZFL_DEVICE = "ByzFL's runs: torch on the same CPU"
HONEST = 10  # ByzFL's nb_honest_clients


def column(f: int, attack: str, gamma: float = 1.0) -> str:
    """A setting's column label: "f=3 ALIE", and " gamma=0.5" after it for a non-iid split."""
    return f"f={f} {attack}" + ("" if gamma == 1 else f" gamma={gamma:g}")


def setting(base: train.TrainConfig, row: str, attack: str, f: int, gamma: float = 1.0) -> dict:
    """Everything both sides need for one cell: flagjax config overrides and ByzFL's configuration.
    ``gamma`` < 1: ByzFL's gamma-similarity split (``gamma_similarity_niid``) on both sides, over the honest
    clients only (flagjax: ``shard="gamma"``, ``split_among="honest"``)."""
    p = HONEST + f
    rule, rule_hp, agg_info, pre = _rules(p, f)[row]
    atk, atk_hp, byz_name = ATTACKS[attack]
    hp = {"num_workers": p, "num_byzantine": f, "rule": rule, "attack": atk}
    if gamma != 1:
        hp.update(shard="gamma", gamma_similarity=float(gamma), split_among="honest")
    if rule_hp:
        hp["rule_hparams"] = dict(rule_hp)
    atk_hp = dict(atk_hp)
    if atk.startswith("optimal"):  # the attacker knows the defence
        atk_hp.update(rule=rule, **({"rule_hparams": dict(rule_hp)} if rule_hp else {}))
    if atk_hp:
        hp["attack_hparams"] = atk_hp
    return {"flagjax": hp, "byzfl": None if agg_info is None else {"agg": agg_info, "pre": pre, "attack": byz_name}}


# ByzFL's benchmark optimisation setting in flagjax's fields: batch 25 per client, server SGD lr 0.1 without
# momentum or decay, weight decay 1e-4, each honest client sending its momentum (beta 0.9)
BYZFL_OPTIMISATION = dict(batch_size=25, lr=0.1, momentum=0.0, worker_momentum=0.9, weight_decay=1e-4, lr_decay=1.0)


def base_config(args) -> train.TrainConfig:
    """ByzFL's benchmark setting as a flagjax config (``--quick``: synthetic data, a few steps)."""
    return common.base_config(
        args, model="cnn_mnist", val_fraction=0.2, steps=800, eval_every=100, log_every=50, **BYZFL_OPTIMISATION
    )


# ----------------------------------------------------------------------------------------- ByzFL's side


def register_paper_cnn() -> str:
    """Register the FA paper's CNN (``flagjax.models.PaperCNN``) as a torch model in ByzFL's model module,
    so ByzFL's Client/Server can build it (for the step-time benchmark); returns its ByzFL model name."""
    import torch.nn as tnn
    import torch.nn.functional as F

    models = byzfl_module("fed_framework.models")

    class paper_cnn(tnn.Module):  # noqa: N801  (ByzFL looks models up by attribute name)
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = tnn.Conv2d(1, 10, 5), tnn.Conv2d(10, 20, 5)
            self.f1, self.f2 = tnn.Linear(320, 50), tnn.Linear(50, 10)

        def forward(self, x):
            x = F.relu(F.max_pool2d(self.c1(x), 2))
            x = F.relu(F.max_pool2d(self.c2(x), 2))
            x = F.relu(self.f1(x.flatten(1)))
            return F.log_softmax(self.f2(x), dim=1)

    models.paper_cnn = paper_cnn
    return "paper_cnn"


def _torch_data(ds: data.Dataset, eval_examples: int):
    """ByzFL's inputs: (N, 1, 28, 28) float tensors and int64 labels (``targets`` set, as its DataDistributor
    reads them from the data set), the test split in batches of 128 (its ``batch_size_evaluation``)."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    x = torch.from_numpy(np.ascontiguousarray(ds.train_x.transpose(0, 3, 1, 2)))
    y = torch.from_numpy(ds.train_y.astype(np.int64))
    full = TensorDataset(x, y)
    full.targets = y
    n_test = len(ds.test_y) if eval_examples <= 0 else min(eval_examples, len(ds.test_y))
    tx = torch.from_numpy(np.ascontiguousarray(ds.test_x[:n_test].transpose(0, 3, 1, 2)))
    ty = torch.from_numpy(ds.test_y[:n_test].astype(np.int64))
    return full, DataLoader(TensorDataset(tx, ty), batch_size=128, shuffle=False)


def byzfl_training(cfg: train.TrainConfig, spec: dict, ds: data.Dataset, *, model_name: str = "cnn_mnist"):
    """ByzFL's objects for one run of ``cfg``: (honest clients, Byzantine client, server), built as its
    ``byzfl/benchmark/train.py`` builds them (seeded with ``cfg.seed`` for the split, weights and batches)."""
    import torch
    from torch.utils.data import random_split

    fw = byzfl_module("fed_framework")
    misc = byzfl_module("utils.misc")
    f = cfg.num_byzantine
    misc.set_random_seed(cfg.seed)
    full, test_loader = _torch_data(ds, cfg.eval_examples)
    n_train = int((1 - cfg.val_fraction) * len(full))
    train_ds, _ = random_split(full, [n_train, len(full) - n_train])
    if cfg.shard not in ("iid", "gamma"):
        raise ValueError(f"ByzFL's side runs shard='iid' or 'gamma' (its gamma_similarity_niid); got {cfg.shard!r}")
    loaders = fw.DataDistributor(
        {
            "data_distribution_name": "iid" if cfg.shard == "iid" else "gamma_similarity_niid",
            "distribution_parameter": 1.0 if cfg.shard == "iid" else float(cfg.gamma_similarity),
            "nb_honest": cfg.num_workers - f,
            "data_loader": train_ds,
            "batch_size": cfg.batch_size,
        }
    ).split_data()
    common_params = {
        "model_name": model_name,
        "device": "cpu",
        "optimizer_name": "SGD",
        "learning_rate": float(cfg.lr),
        "weight_decay": float(cfg.weight_decay),
        "milestones": [],
        "learning_rate_decay": 1.0,
    }
    clients = [
        fw.Client(
            {
                **common_params,
                "loss_name": "NLLLoss",
                "LabelFlipping": False,
                "training_dataloader": loader,
                "momentum": float(cfg.worker_momentum),
                "nb_labels": ds.num_classes,
                "store_per_client_metrics": False,
            }
        )
        for loader in loaders
    ]
    server = fw.Server(
        {
            **common_params,
            "validation_loader": None,
            "test_loader": test_loader,
            "aggregator_info": spec["agg"],
            "pre_agg_list": spec["pre"],
        }
    )
    byz = fw.ByzantineClient(
        {
            "name": spec["attack"],
            "f": f,
            "parameters": {"aggregator_info": spec["agg"], "pre_agg_list": spec["pre"], "f": f},
        }
    )
    misc.set_random_seed(cfg.seed)  # ByzFL re-seeds with the training seed before its loop
    model = server.get_dict_parameters()
    for c in clients:
        c.set_model_state(model)
    torch.set_grad_enabled(True)
    return clients, byz, server


def byzfl_step(clients, byz, server) -> float:
    """One DSGD step of ByzFL's benchmark loop (``byzfl/benchmark/train.py``), line for line; returns the
    honest clients' mean training loss."""
    loss = float(np.mean([c.compute_gradients() for c in clients]))
    honest = [c.get_flat_gradients_with_momentum() for c in clients]
    server.update_model_with_gradients(honest + byz.apply_attack(honest))
    model = server.get_dict_parameters()
    for c in clients:
        c.set_model_state(model)
    return loss


def byzfl_run(cfg: train.TrainConfig, spec: dict, ds: data.Dataset) -> list[dict]:
    """Train one run with ByzFL; a flagjax-style history (test accuracy every ``eval_every`` steps and at
    the end; ``step_time`` the median step of the preceding interval, evaluations excluded)."""
    clients, byz, server = byzfl_training(cfg, spec, ds)
    hist, times, t0 = [], [], time.perf_counter()
    for step in range(cfg.steps):
        ts = time.perf_counter()
        loss = byzfl_step(clients, byz, server)
        times.append(time.perf_counter() - ts)
        done = step + 1
        if done % cfg.eval_every == 0 or done == cfg.steps:
            hist.append(
                {
                    "step": done,
                    "test_accuracy": float(server.compute_test_accuracy()),
                    "loss": loss,
                    "wall_time": time.perf_counter() - t0,
                    "step_time": statistics.median(times),
                }
            )
            times = []
    return hist


# ----------------------------------------------------------------------------------------- the report


def versions() -> str:
    import jax
    import torch

    v = {k: importlib.metadata.version(k) for k in ("byzfl", "flax", "optax")}
    return f"byzfl {v['byzfl']}, torch {torch.__version__}; jax {jax.__version__}, flax {v['flax']}, optax {v['optax']}"


def _step_ms(rec: dict, *, skip_first: bool) -> float | None:
    """Median step time (ms) over a run's history lines (after the first, which holds flagjax's compilation,
    with ``skip_first``)."""
    ts = [h["step_time"] for h in rec["history"][int(skip_first) :] if h.get("step_time")]
    return 1e3 * statistics.median(ts) if ts else None


def comparison_table(fx: list[dict], bz: list[dict]) -> str:
    """Per cell: each library's final test accuracy mean ± std, the difference, the agreement bound
    max(2 x pooled std, 0.02) and whether the difference is within it."""

    def by(recs):
        out: dict = {}
        for r in recs:
            out.setdefault((r["row"], r["col"]), []).append(r["test_accuracy"])
        return out

    a, b = by(fx), by(bz)
    lines = [
        "| rule | setting | flagjax | ByzFL | flagjax - ByzFL | bound | agree |",
        "|---|---|---|---|---|---|---|",
    ]
    for key in dict.fromkeys((r["row"], r["col"]) for r in fx):
        va, vb = a.get(key, []), b.get(key, [])
        fa = f"{np.mean(va):.3f} ± {np.std(va):.3f}" if va else "—"
        if not vb:
            lines.append(f"| {key[0]} | {key[1]} | {fa} | — | | | |")
            continue
        pooled = float(np.sqrt((np.var(va) + np.var(vb)) / 2))
        bound = max(2 * pooled, 0.02)
        diff = float(np.mean(va) - np.mean(vb))
        ok = "yes" if abs(diff) <= bound else "**no**"
        lines.append(
            f"| {key[0]} | {key[1]} | {fa} | {np.mean(vb):.3f} ± {np.std(vb):.3f} | {diff:+.3f} | {bound:.3f} | {ok} |"
        )
    return "\n".join(lines)


def speed_table(fx: list[dict], bz: list[dict]) -> str:
    """Median per-step time (ms, evaluations and flagjax's compilation excluded) and wall time per run (s)
    for each library, pooled over every run of a setting's cells."""
    lines = [
        "| setting | flagjax ms/step | ByzFL ms/step | flagjax / ByzFL | flagjax s/run | ByzFL s/run |",
        "|---|---|---|---|---|---|",
    ]
    for col in dict.fromkeys(r["col"] for r in fx):
        keys = {(r["row"]) for r in bz if r["col"] == col}
        sa = [_step_ms(r, skip_first=True) for r in fx if r["col"] == col and r["row"] in keys]
        sb = [_step_ms(r, skip_first=False) for r in bz if r["col"] == col]
        sa, sb = [s for s in sa if s], [s for s in sb if s]
        if not sa or not sb:
            continue
        wa = [r["wall_time"] for r in fx if r["col"] == col and r["row"] in keys]
        wb = [r["wall_time"] for r in bz if r["col"] == col]
        ma, mb = statistics.median(sa), statistics.median(sb)
        lines.append(f"| {col} | {ma:.1f} | {mb:.1f} | {ma / mb:.2f} | {np.mean(wa):.0f} | {np.mean(wb):.0f} |")
    return "\n".join(lines)


def parse_args(argv=None):
    """The common experiment flags plus ``--attacks`` and ``--fs`` (comma-separated subsets)."""
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--attacks", default="SF,ALIE,opt-IPM,opt-ALIE")
    extra.add_argument("--fs", default="1,3")
    extra.add_argument("--gammas", default="1", help="data splits: 1 = iid, g < 1 = ByzFL's gamma-similarity")
    known, rest = extra.parse_known_args(sys.argv[1:] if argv is None else argv)
    args = common.parse_args("peer_byzfl", __doc__, rest)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.attacks = [a for a in known.attacks.split(",") if a]
    unknown = [a for a in args.attacks if a not in ATTACKS]
    if unknown:
        raise SystemExit(f"--attacks: unknown {unknown}; known: {list(ATTACKS)}")
    args.fs = [int(x) for x in known.fs.split(",") if x]
    args.gammas = [float(x) for x in known.gammas.split(",") if x]
    bad = [g for g in args.gammas if not 0 <= g <= 1]
    if bad:
        raise SystemExit(f"--gammas: each must be in [0, 1]; got {bad}")
    return args


def main(argv=None):
    from tqdm import tqdm

    args = parse_args(argv)
    base = base_config(args)
    grid = [(f, a, g) for g in args.gammas for f in args.fs for a in args.attacks]
    cols = [column(f, a, g) for f, a, g in grid]
    specs = {(row, column(f, a, g)): setting(base, row, a, f, g) for row in ROWS for f, a, g in grid}
    cells = [common.Cell(row, col, specs[row, col]["flagjax"]) for row in ROWS for col in cols]
    fx = common.run_cells(args, cells, base, batch=False)  # one program per run: its step times are its own
    # ByzFL's side: the cells flagjax ran (after --rows/--cols/--quick), where ByzFL has the rule
    runs = common.store(args)
    ds = data.load_dataset(base.dataset, base.data_dir or None)
    todo = [(r["row"], r["col"], r["seed"]) for r in fx if specs[r["row"], r["col"]]["byzfl"] is not None]
    bz = []
    for row, col, seed in tqdm(todo, desc="peer_byzfl: ByzFL", unit="run", file=sys.stderr):
        run_id = common._slug(f"byzfl__{row}__{col}__s{seed}")
        if run_id not in runs:
            common._refuse_training_if_read_only(runs.path, [run_id])
            cfg = train.apply_overrides(base, [])
            for k, v in specs[row, col]["flagjax"].items():
                setattr(cfg, k, v)
            cfg.seed = seed
            hist = byzfl_run(cfg, specs[row, col]["byzfl"], ds)
            runs.put(
                run_id, {"meta": {"library": "byzfl", "device": BYZFL_DEVICE, "versions": versions()}, "history": hist}
            )
        rec = runs.get(run_id)
        bz.append(common._record(row, col, seed, rec["history"], rec["meta"]["device"]))
    both = {(r["row"], r["col"]) for r in bz}
    bars = [
        {**r, "row": lib, "col": f"{r['row']}\n{r['col']}"}
        for lib, recs in (("flagjax", fx), ("ByzFL", bz))
        for r in recs
        if (r["row"], r["col"]) in both
    ]
    plot = common.plot_bars(
        args, bars, "accuracy.png", title="Final test accuracy: flagjax and ByzFL on the same experiment"
    )
    body = (
        f"Versions: {versions()}.\n\n"
        f"Setting: {base.steps} steps, batch {base.batch_size} per client, 10 honest clients + f Byzantine, "
        f"model {base.model}, data {base.dataset}.\n\n"
        "## Final test accuracy\n\nbound = max(2 x pooled std over seeds, 0.02); agree = |difference| <= bound.\n\n"
        f"{comparison_table(fx, bz)}\n\n![accuracy]({plot.name})\n\n"
        "## Time\n\nMedian time per training step (evaluations and flagjax's compilation excluded) over the "
        "runs of the rules both libraries ran, and mean wall time per run (flagjax's includes compiling "
        "its step and evaluation programs). Both on the same CPU, one after the other, taken from the "
        "experiment's own runs with whatever else the machine was running at the time; the controlled "
        "comparison (same model, workers and batch, the two libraries timed in alternating blocks) is "
        "benchmarks/results/peer_step.md.\n\n"
        f"{speed_table(fx, bz)}\n"
    )
    print(
        common.write_report(
            args,
            "Head-to-head with ByzFL's training framework",
            body,
            fx + [{**r, "row": r["row"] + " [ByzFL]"} for r in bz],
        )
    )


if __name__ == "__main__":
    main()
