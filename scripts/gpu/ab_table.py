#!/usr/bin/env python3
"""Tabulates `scripts/gpu/ab.sh` output: for each (shape, batch, format) the fastest time (µs)
of each variant over the rounds, and the last variant's time over the first's.

    python3 scripts/gpu/ab_table.py scripts/gpu/results/<call>/ab.txt [more files]
"""
import collections
import sys


def main(paths):
    times = collections.defaultdict(list)
    variant = None
    for path in paths:
        for line in open(path):
            if line.startswith("##"):
                variant = line.split("current")[-1].strip() if "current" in line else "baseline"
                continue
            f = line.split()
            if len(f) >= 4 and "x" in f[0] and f[2].startswith("q4-"):
                times[(f[0], int(f[1]), f[2][3:], variant)].append(float(f[3]))
    variants = sorted({k[3] for k in times})
    points = sorted({k[:3] for k in times}, key=lambda k: (k[2], k[0], k[1]))
    print("shape batch format", *variants, "last/first")
    for p in points:
        best = [min(times.get(p + (v,), [float("nan")])) for v in variants]
        cells = " ".join(f"{t:7.1f}" for t in best)
        print(f"{p[0]:>11} {p[1]:3d} {p[2]:6s} {cells} {best[-1] / best[0]:.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
