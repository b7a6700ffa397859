#!/usr/bin/env python3
"""Draw the benchmark chart: bench/plot.py RESULTS.json OUT.png (needs matplotlib)."""
import json
import statistics
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"direct": "#9e9e9e", "trellis": "#2e7d32", "envoy": "#8e24aa", "nginx": "#1565c0",
          "haproxy": "#ef6c00", "trellis-before": "#81c784"}


def runs(res, scen, target):
    rs = res.get(scen, {}).get(target)
    return rs if isinstance(rs, list) and rs else None


def main():
    data = json.load(open(sys.argv[1]))
    res, targets = data["results"], data["targets"]
    load_scens = [s for s in data["scenarios"] if s != "memory"]
    first = "small" if "small" in load_scens else (load_scens[0] if load_scens else None)
    panels = 2 + (1 if len(load_scens) > 1 else 0) + (1 if "memory" in data["scenarios"] else 0)
    cols = 2 if panels > 1 else 1
    rows = (panels + 1) // 2
    fig, grid = plt.subplots(rows, cols, figsize=(6.4 * cols, 4.4 * rows), squeeze=False)
    axes = [ax for row in grid for ax in row]
    for ax in axes[panels:]:
        ax.axis("off")
    ax_i = 0

    def bars(ax, scen, key, title, ylabel, scale=1.0):
        xs, meds, lo, hi, cols = [], [], [], [], []
        for t in targets:
            rs = runs(res, scen, t)
            vals = [r.get(key) for r in rs or [] if r.get(key) is not None]
            if not vals:
                continue
            m = statistics.median(vals) * scale
            xs.append(t)
            meds.append(m)
            lo.append(m - min(vals) * scale)
            hi.append(max(vals) * scale - m)
            cols.append(COLORS.get(t, "#555"))
        ax.bar(xs, meds, yerr=[lo, hi], color=cols, capsize=4)
        for i, m in enumerate(meds):
            ax.text(i, m, f"{m:,.0f}" if m >= 100 else f"{m:.1f}", ha="center", va="bottom", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)

    if first:
        bars(axes[ax_i], first, "rps", f"{first}: requests/s (median, min–max)", "req/s")
        ax_i += 1
        bars(axes[ax_i], first, "cpu_us", f"{first}: proxy CPU µs per request\n(direct = upstream's own)",
             "µs/request")
        ax_i += 1
    if len(load_scens) > 1:
        ax = axes[ax_i]
        ax_i += 1
        width = 0.8 / max(1, len(targets))
        for j, t in enumerate(targets):
            ys = []
            for s in load_scens:
                d = runs(res, s, "direct")
                r = runs(res, s, t)
                if d and r:
                    ys.append(100 * statistics.median([x["rps"] for x in r]) /
                              statistics.median([x["rps"] for x in d]))
                else:
                    ys.append(0)
            ax.bar([i + j * width for i in range(len(load_scens))], ys, width, label=t,
                   color=COLORS.get(t, "#555"))
        ax.set_xticks([i + width * (len(targets) - 1) / 2 for i in range(len(load_scens))])
        ax.set_xticklabels(load_scens)
        ax.set_ylabel("% of direct req/s (0 = n/a)")
        ax.set_title("req/s relative to direct, all scenarios", fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    if "memory" in data["scenarios"]:
        ax = axes[ax_i]
        xs, idle, loaded = [], [], []
        for t in targets:
            r = runs(res, "memory", t)
            if not r:
                continue
            xs.append(t)
            idle.append(statistics.median([x["idle_kib"] for x in r]) / 1024)
            loaded.append(statistics.median([x["loaded_kib"] for x in r]) / 1024)
        pos = range(len(xs))
        ax.bar([p - 0.2 for p in pos], idle, 0.4, label="idle", color="#90caf9")
        ax.bar([p + 0.2 for p in pos], loaded, 0.4, label="10k idle conns", color="#1565c0")
        for p, v in zip(pos, loaded):
            ax.text(p + 0.2, v, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(pos))
        ax.set_xticklabels(xs)
        ax.set_ylabel("RSS MiB")
        ax.set_title("memory", fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"Trellis benchmark {data.get('date', '')} (proxy on 1 core, 1 worker)", fontsize=11)
    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=110)


if __name__ == "__main__":
    main()
