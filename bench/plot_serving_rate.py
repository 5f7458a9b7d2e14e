"""Plot rate sweeps (JSON lines from bench/serving_rate.py): p99 ITL and p99 TTFT against request rate,
one line per labelled run (e.g. budget 2048, budget 8192, a latency target) on one PNG.

usage: python bench/plot_serving_rate.py OUT.png RESULTS.jsonl [RESULTS.jsonl ...] [--workload mixed]
A row's "label" names its line (serving_rate.py --label); rows without one take their file's name.
Needs matplotlib (not in requirements.txt: install it where the plot is drawn).
"""
import argparse
import json
import os
from collections import defaultdict

# (row key, panel title); chat TTFT where the run has chat-sized requests, else all requests
PANELS = (("itl_p99_ms", "ITL p99 (ms)"), ("ttft_chat_p99_ms", "chat TTFT p99 (ms)"))


def load_runs(paths, workload=""):
    """label -> rows sorted by rate."""
    runs = defaultdict(list)
    for path in paths:
        with open(path) as f:
            for row in (json.loads(line) for line in f if line.strip()):
                if not workload or row.get("workload") == workload:
                    runs[row.get("label") or os.path.splitext(os.path.basename(path))[0]].append(row)
    return {label: sorted(rows, key=lambda r: r["rate"]) for label, rows in runs.items()}


def value(row, key):
    if row.get(key) is None and key == "ttft_chat_p99_ms":
        return row.get("ttft_p99_ms")
    return row.get(key)


def plot(runs, out, title=""):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    fig, axes = plt.subplots(1, len(PANELS), figsize=(6 * len(PANELS), 4.2))
    for ax, (key, panel_title) in zip(axes, PANELS):
        for label, rows in runs.items():
            points = [(r["rate"], value(r, key)) for r in rows if value(r, key) is not None]
            ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=label)
        ax.set(title=panel_title, xlabel="request rate (req/s)", yscale="log")
        for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            axis(ScalarFormatter())   # 20, 30, 40 rather than 2 x 10^1 on the log scale
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=90)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("results", nargs="+")
    ap.add_argument("--workload", default="", help="only rows of this workload (mixed, sharegpt)")
    ap.add_argument("--title", default="")
    a = ap.parse_args(argv)
    runs = load_runs(a.results, a.workload)
    if not runs:
        raise SystemExit("no rows to plot")
    plot(runs, a.out, a.title)


if __name__ == "__main__":
    main()
