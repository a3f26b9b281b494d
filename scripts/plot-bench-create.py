"""Plots CreateVolume throughput against concurrency, one line per driver,
from the rows `cinderblock bench create --csv` prints.

Usage: plot-bench-create.py ROWS.csv OUT.png [CAPTION]
(CAPTION, e.g. where the drivers kept their data, goes under the title.)
"""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

NAMES = {"cinderblock": "cinderblock (standalone, 3 nodes)", "hostpath": "csi-driver-host-path"}


def main(rows_path, out_path, caption=None):
    by_driver = {}
    for label, conc, _count, rate, p50, p99, _load in csv.reader(open(rows_path)):
        by_driver.setdefault(label, []).append((int(conc), float(rate), float(p50), float(p99)))
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for label, points in by_driver.items():
        points.sort()
        xs = [p[0] for p in points]
        ax.plot(xs, [p[1] for p in points], marker="o", label=NAMES.get(label, label))
        for x, rate, p50, _ in points:
            ax.annotate(f"{rate:.0f}/s\np50 {p50:.0f} ms", (x, rate), textcoords="offset points", xytext=(4, 6), fontsize=7)
    top = max(p[1] for points in by_driver.values() for p in points)
    ax.set_ylim(0, top * 1.18)  # from zero, with room for the top labels
    ax.set_xscale("log", base=2)
    ax.set_xticks([1, 16, 64, 256])
    ax.set_xlim(0.8, 512)  # room for the labels right of the last point
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("concurrent CreateVolume calls")
    ax.set_ylabel("volumes created per second")
    ax.set_title("CreateVolume throughput against concurrency" + (f"\n{caption}" if caption else ""), fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path)


if __name__ == "__main__":
    main(*sys.argv[1:4])
