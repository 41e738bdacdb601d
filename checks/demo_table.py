"""
One table, one JSON and one bar chart from the `make demo` runs (every results.json under a folder).

  python checks/demo_table.py out/demo
Columns: final validation accuracy (a question has two options: 0.5 is chance), mean generated
tokens (text tokens, plus continuous thoughts for the Coconut-style models, as in the paper's
Table 1), training and evaluation wall time.
"""

import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402


def main(folder):
    runs = []
    for path in sorted(glob.glob(os.path.join(folder, "*", "results.json"))):
        r = json.load(open(path))
        final = r["final"]
        runs.append({"model": r["name"], "method": r["method"], "feedback_mode": r["feedback_mode"],
                     "accuracy": final["accuracy"], "n_eval": final["n"],
                     "tokens": final["mean_new_tokens"] + final["mean_thoughts"],
                     "thoughts": final["mean_thoughts"], "best_accuracy": r["best"]["accuracy"],
                     "train_time_s": r["train_time_s"], "eval_time_s": final["eval_time_s"]})
    if not runs:
        sys.exit(f"no results.json under {folder}")
    header = f"{'model':26s} {'accuracy':>9s} {'best':>6s} {'tokens':>7s} {'thoughts':>8s} {'train s':>8s} {'eval s':>7s}"
    print(header)
    print("-" * len(header))
    for r in runs:
        print(f"{r['model']:26s} {r['accuracy']:9.3f} {r['best_accuracy']:6.3f} {r['tokens']:7.1f} "
              f"{r['thoughts']:8.1f} {r['train_time_s']:8.0f} {r['eval_time_s']:7.1f}")
    print(f"(n = {runs[0]['n_eval']} validation questions; two options each, so 0.5 is chance)")
    common.write_json(runs, os.path.join(folder, "demo_results.json"))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 3.5))
    bars = ax.bar([r["model"] for r in runs], [r["accuracy"] for r in runs], color="tab:blue")
    ax.bar_label(bars, fmt="%.2f")
    ax.axhline(0.5, color="gray", linestyle="--", label="chance (2 options)")
    ax.set(ylabel="validation accuracy", ylim=(0, 1), title="latentkit demo: small-graph ProsQA, CPU")
    ax.tick_params(axis="x", labelrotation=20)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "demo_accuracy.png"), dpi=100)
    print(f"wrote {os.path.join(folder, 'demo_results.json')} and demo_accuracy.png")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "out/demo")
