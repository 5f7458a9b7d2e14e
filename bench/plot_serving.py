"""Plot a serving sweep (JSON lines from bench/serving.py) as a PNG: throughput, TTFT and ITL vs concurrency.

usage: python bench/plot_serving.py RESULTS.jsonl OUT.png [--offline TOK_S]
"""
import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("out")
    ap.add_argument("--offline", type=float, default=0.0, help="offline output tok/s, drawn as a line")
    a = ap.parse_args()
    rows = sorted((json.loads(line) for line in open(a.results) if line.strip()), key=lambda r: r["concurrency"])
    c = [r["concurrency"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    axes[0].plot(c, [r["output_tok_s"] for r in rows], "o-", label="tritonserver + llm model")
    if a.offline:
        axes[0].axhline(a.offline, color="gray", ls="--", label=f"offline engine ({a.offline:.0f})")
    axes[0].set(title="output tokens/s", xlabel="concurrency")
    axes[0].legend()
    for ax, key, title in ((axes[1], "ttft", "time to first token (ms)"), (axes[2], "itl", "inter-token latency (ms)")):
        ax.plot(c, [r[f"{key}_p50_ms"] for r in rows], "o-", label="p50")
        ax.plot(c, [r[f"{key}_p99_ms"] for r in rows], "s--", label="p99")
        ax.set(title=title, xlabel="concurrency", yscale="log")
        ax.legend()
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    shape = rows[0].get("shape", "")
    fig.suptitle(f"Serving sweep, {shape} shape, {rows[0]['input_len']} in / {rows[0]['output_len']} out, H100")
    fig.tight_layout()
    fig.savefig(a.out, dpi=90)


if __name__ == "__main__":
    main()
