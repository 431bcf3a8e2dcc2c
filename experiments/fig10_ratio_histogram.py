"""Paper Fig. 3 (our Fig. 10): histograms of the workers' reconstruction ratios ||Y^T x_i||^2 under FA's
subspace and under the (1-D) mean direction, during FA training with f = 3 of 15 uniform-random workers.
Ratios are logged every ``log_every`` steps by the training loop (``ratios``, ``mean_ratios``)."""

import numpy as np

from experiments import common


def main(argv=None):
    args = common.parse_args("fig10_ratio_histogram", __doc__, argv)
    base = common.base_config(args)
    recs = common.run_cells(args, [common.Cell("flag", "f=3", {"rule": "flag", "num_byzantine": 3})], base)
    p, f = base.num_workers, 3
    fa = {"honest": [], "byzantine": []}
    mean = {"honest": [], "byzantine": []}
    for r in recs:
        for h in r["history"]:
            if "ratios" not in h:
                continue
            fa["honest"] += h["ratios"][: p - f]
            fa["byzantine"] += h["ratios"][p - f :]
            mean["honest"] += h["mean_ratios"][: p - f]
            mean["byzantine"] += h["mean_ratios"][p - f :]
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), sharey=True)
    bins = np.linspace(0, 1, 26)
    for ax, (name, d) in zip(axes, (("FA subspace (r = 8)", fa), ("mean direction", mean)), strict=True):
        ax.hist(d["honest"], bins=bins, alpha=0.7, label="honest", density=True)
        ax.hist(d["byzantine"], bins=bins, alpha=0.7, label="Byzantine", density=True)
        ax.set_title(name)
        ax.set_xlabel("reconstruction ratio")
        ax.legend()
    common.save_figure(args, fig, "ratio_histogram.png")

    def row(name, d):
        h, b = np.asarray(d["honest"]), np.asarray(d["byzantine"])
        return f"| {name} | {h.mean():.3f} | {np.median(h):.3f} | {b.mean():.3f} | {np.median(b):.3f} |"

    body = "\n".join(
        [
            "| projection | honest mean | honest median | Byzantine mean | Byzantine median |",
            "|---|---|---|---|---|",
            row("FA subspace", fa),
            row("mean direction", mean),
            "",
            f"{len(fa['honest'])} honest and {len(fa['byzantine'])} Byzantine ratios from the logged steps.",
            "",
            "![ratios](ratio_histogram.png)",
        ]
    )
    print(common.write_report(args, "Fig. 10 — worker ratios under FA vs the mean direction", body, recs))


if __name__ == "__main__":
    main()
