#!/usr/bin/env python3
"""Plots for `omniattn bench`, drawn from its results.json (schema: bench/README.md).

usage: plot.py RESULTS_JSON [OUT_DIR]

Writes into OUT_DIR (default: the directory of RESULTS_JSON):
  throughput.png  useful GFLOP/s vs N for every swept workload, one panel per group, OpenBLAS unfused dashed
  peak_pct.png    % of the machine peak vs N (swept workloads) and per fixed-shape workload (bars)
  memory.png      workspace memory vs N: the fused kernel against the unfused OpenBLAS path
  efficiency.png  time vs N of each swept pattern against the dense and causal references (efficiency length)
  naive_local.png useful GFLOP/s of the fused kernel and the naive neighborhood baseline, per grid-local row
Rows of the largest thread count in the run are plotted. Exit status 3 when matplotlib is missing (the benchmark
then notes it and skips the plots), 1 on unreadable input.
"""
import json
import math
import os
import sys


def load(path):
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    rows = [r for r in doc.get("rows", []) if r.get("error") is None and r.get("median_ms") is not None]
    if rows:
        top = max(r["threads"] for r in rows)
        rows = [r for r in rows if r["threads"] == top]
    return doc, rows


def series(rows):
    """workload -> sorted [(n, row)], for workloads measured at two or more N."""
    by = {}
    for r in rows:
        by.setdefault(r["workload"], {})[r["n"]] = r
    return {w: sorted(pts.items()) for w, pts in by.items() if len(pts) >= 2}


def groups_of(swept):
    order = []
    for w in swept:
        g = w.split("/")[0]
        if g not in order:
            order.append(g)
    return order


def log2_axis(ax):
    ax.set_xscale("log", base=2)
    ax.grid(True, which="both", alpha=0.3)


def main(argv):
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 1
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from cycler import cycler
    except ImportError:
        return 3
    # Twenty distinct colours: the mask catalogue alone has a dozen lines.
    plt.rcParams["axes.prop_cycle"] = cycler(color=[plt.cm.tab20(i) for i in range(0, 20, 2)] +
                                             [plt.cm.tab20(i) for i in range(1, 20, 2)])
    results = argv[1]
    out_dir = argv[2] if len(argv) > 2 else os.path.dirname(os.path.abspath(results))
    try:
        doc, rows = load(results)
    except (OSError, ValueError) as e:
        print(f"plot.py: cannot read {results}: {e}", file=sys.stderr)
        return 1
    if not rows:
        return 0
    machine = doc.get("machine", {})
    threads = rows[0]["threads"]
    subtitle = f"{machine.get('cpu', '?')}, {machine.get('isa', '?')}, {threads} thread(s)"
    swept = series(rows)
    groups = groups_of(swept)
    fixed = [r for r in rows if r["workload"] not in swept]

    def blas_line(ax, pts, key, label):
        xs = [n for n, r in pts if r.get(key) is not None]
        ys = [r[key] for n, r in pts if r.get(key) is not None]
        if xs:
            ax.plot(xs, ys, "k--", linewidth=1.5, label=label)

    # Throughput vs N.
    if groups:
        fig, axes = plt.subplots(1, len(groups), figsize=(6.5 * len(groups), 4.8), squeeze=False)
        for ax, g in zip(axes[0], groups):
            ref = None
            for w, pts in swept.items():
                if w.split("/")[0] != g:
                    continue
                ax.plot([n for n, _ in pts], [r["gflops"] for _, r in pts], marker="o", markersize=3, label=w.split("/", 1)[-1])
                if ref is None and not pts[0][1].get("mask") and pts[0][1]["causal"] == "none":
                    ref = pts
            if ref:
                blas_line(ax, ref, "openblas_gflops", "OpenBLAS unfused (dense)")
            log2_axis(ax)
            ax.set_xlabel("N (keys)")
            ax.set_ylabel("useful GFLOP/s")
            ax.set_title(g)
            ax.legend(fontsize=7)
        fig.suptitle("fused kernel throughput vs N - " + subtitle, fontsize=10)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "throughput.png"), dpi=110)
        plt.close(fig)

    # % of peak: swept workloads vs N, fixed shapes as bars.
    panels = (1 if swept else 0) + (1 if fixed else 0)
    if panels:
        fig, axes = plt.subplots(1, panels, figsize=(7 * panels, 4.8), squeeze=False)
        i = 0
        if swept:
            ax = axes[0][i]
            i += 1
            for w, pts in swept.items():
                ax.plot([n for n, _ in pts], [r["pct_peak"] for _, r in pts], marker="o", markersize=3, label=w)
            log2_axis(ax)
            ax.set_xlabel("N (keys)")
            ax.set_ylabel("% of peak")
            ax.set_ylim(bottom=0)
            ax.legend(fontsize=6, ncol=2)
        if fixed:
            ax = axes[0][i]
            labels = [f"{r['workload']} n={r['n']}" for r in fixed]
            ax.barh(labels, [r["pct_peak"] for r in fixed], color="tab:blue")
            ax.set_xlabel("% of peak")
            ax.invert_yaxis()
            ax.tick_params(axis="y", labelsize=7)
            ax.grid(True, axis="x", alpha=0.3)
        fig.suptitle("% of the measured peak (fp32 FMA, or bf16 dot for bf16dot kernels) - " + subtitle, fontsize=10)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "peak_pct.png"), dpi=110)
        plt.close(fig)

    # Memory vs N: workspace of the fused kernel vs the unfused OpenBLAS path, for the unmasked workloads (a mask
    # changes neither: the kernel's buffers do not depend on it, and OpenBLAS runs the dense problem).
    unmasked = {w: pts for w, pts in swept.items() if not pts[0][1].get("mask")}
    if unmasked:
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        for w, pts in unmasked.items():
            ws = [(n, r["workspace_mib"]) for n, r in pts if r.get("workspace_mib") is not None]
            if ws:
                ax.plot([n for n, _ in ws], [max(y, 0.01) for _, y in ws], marker="o", markersize=3, label=f"{w} fused")
            bl = [(n, r["openblas_workspace_mib"]) for n, r in pts if r.get("openblas_workspace_mib") is not None]
            if bl:
                ax.plot([n for n, _ in bl], [max(y, 0.01) for _, y in bl], linestyle="--", marker="s", markersize=3,
                        color=ax.lines[-1].get_color() if ws else None, label=f"{w} OpenBLAS unfused")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.set_xlabel("N (keys)")
        ax.set_ylabel("workspace MiB (peak RSS over the inputs)")
        ax.legend(fontsize=6, ncol=2)
        ax.set_title("memory vs N - " + subtitle, fontsize=10)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "memory.png"), dpi=110)
        plt.close(fig)

    # Efficiency length: time vs N of each pattern with references against the references.
    eff = [e for e in doc.get("efficiency_lengths", []) if e["threads"] == threads and e["workload"] in swept]
    if eff:
        fig, ax = plt.subplots(figsize=(8, 5.2))
        refs = []
        for e in eff:
            for c in e["vs"]:
                if c["reference"] != "openblas" and c["reference"] in swept and c["reference"] not in refs:
                    refs.append(c["reference"])
        for w, style in zip(refs, ["-", "-.", ":", (0, (5, 1))]):
            pts = swept[w]
            ax.plot([n for n, _ in pts], [r["median_ms"] for _, r in pts], color="black", linestyle=style, linewidth=2.5,
                    alpha=0.7, label=f"{w} (reference)")
        if refs:
            pts = swept[refs[0]]
            xs = [n for n, r in pts if r.get("openblas_ms") is not None]
            ax.plot(xs, [r["openblas_ms"] for n, r in pts if r.get("openblas_ms") is not None], color="grey", linestyle="--",
                    linewidth=2, label="OpenBLAS unfused (dense)")
        for e in eff:
            w = e["workload"]
            if w in refs:
                continue
            pts = swept[w]
            ax.plot([n for n, _ in pts], [r["median_ms"] for _, r in pts], marker="o", markersize=3, label=w)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.set_xlabel("N (keys)")
        ax.set_ylabel("median ms")
        ax.legend(fontsize=6, ncol=2)
        ax.set_title("efficiency length: where a pattern drops below dense / causal - " + subtitle, fontsize=9)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "efficiency.png"), dpi=110)
        plt.close(fig)

    # Neighborhood / halo rows: the fused kernel against the naive per-query baseline, speedup written at the bar.
    local = [r for r in rows if r.get("naive_local_gflops") is not None]
    if local:
        fig, ax = plt.subplots(figsize=(8, 0.55 * len(local) + 1.6))
        labels = [r["workload"] for r in local]
        ys = list(range(len(local)))
        ax.barh([y + 0.2 for y in ys], [r["gflops"] for r in local], height=0.4, label="fused")
        ax.barh([y - 0.2 for y in ys], [r["naive_local_gflops"] for r in local], height=0.4, color="grey",
                label="naive neighborhood baseline")
        for y, r in zip(ys, local):
            ax.text(r["gflops"], y + 0.2, f" {r['naive_local_speedup']:.1f}x", va="center", fontsize=7)
        ax.set_yticks(ys)
        ax.set_yticklabels(labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("useful GFLOP/s")
        ax.grid(True, axis="x", alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_title("fused vs naive neighborhood (x = naive time / fused time) - " + subtitle, fontsize=9)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "naive_local.png"), dpi=110)
        plt.close(fig)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
