"""Write docs/robustness.md: every rule x hostile input kind x f -> pass/fail (tests/robustness_matrix.py).

Usage (from the repository root): python -m scripts.robustness_table [--out docs/robustness.md]
"""

import argparse
import os

from tests import robustness_matrix as rm


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="docs/robustness.md")
    args = ap.parse_args(argv)
    rows = rm.matrix()
    cells = {(n, k, f): (ok, det) for n, k, f, ok, det in rows}
    names = sorted({r[0] for r in rows})
    lines = [
        "# Robustness matrix",
        "",
        "Produced by `python -m scripts.robustness_table` (the same cells are asserted in tests/test_robustness.py).",
        "",
        rm.__doc__.strip().split("\n\n", 1)[1],
        "",
        f"p = {rm.P}, d = {rm.D}, float32. Each cell: pass/FAIL at f = 1 / f = max (the rule's largest f, at most 7).",
        "",
        "| rule | " + " | ".join(rm.KINDS) + " |",
        "|---" * (len(rm.KINDS) + 1) + "|",
    ]
    for n in names:
        fs = rm.f_values(n)
        row = []
        for k in rm.KINDS:
            row.append(" / ".join("pass" if cells[n, k, f][0] else "FAIL" for f in fs))
        note = f" ({rm.ALLOWED_TO_FAIL[n]})" if n in rm.ALLOWED_TO_FAIL else ""
        lines.append(f"| {n}{note} (f = {', '.join(map(str, fs))}) | " + " | ".join(row) + " |")
    fails = [(n, k, f, d) for n, k, f, ok, d in rows if not ok]
    lines += ["", f"{len(rows) - len(fails)} of {len(rows)} cells pass.", ""]
    if fails:
        lines += ["Failures:", ""] + [f"- {n}, {k}, f = {f}: {d}" for n, k, f, d in fails]
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
