#!/usr/bin/env python3
"""Where a kernel's warps stall, by SASS instruction, from ncu's per-instruction samples.

Input: the source page of one profiled launch as CSV, e.g. (on the GPU machine)

    ncu --clock-control none -k regex:dkdvdq --launch-skip 9 --launch-count 1 \
        --section SourceCounters --section WarpStateStats -o fused ftrt bench ...
    ncu --import fused.ncu-rep --page source --csv --print-source sass > fused_sass.csv

Prints the stall reasons over all samples; the samples by how often an instruction ran
(warp-specialized kernels: the consumers' loop runs each instruction the same number of times,
the producer's and the pollers' other counts), each class with its own reasons; then the most
sampled instructions with their two leading reasons. A class or an instruction's share is of
all samples. Session 24 (benches/RESULTS.md, D) read the fused dq pass this way.

Usage: benches/ncu_sass_stalls.py CSV [--top N]
"""
import csv
import sys
from collections import defaultdict

SAMPLES = "Warp Stall Sampling (All Samples)"
EXECUTED = "Instructions Executed"


def number(row, col):
    try:
        return float(row[col] or 0)
    except (ValueError, IndexError):
        return 0.0


def main():
    args = sys.argv[1:]
    if not args or args[0].startswith("-"):
        sys.exit(__doc__)
    top = int(args[args.index("--top") + 1]) if "--top" in args else 30
    with open(args[0], newline="") as f:
        rows = list(csv.reader(f))
    header_at = next((i for i, r in enumerate(rows) if SAMPLES in r), None)
    if header_at is None:
        sys.exit(f"{args[0]}: no '{SAMPLES}' column: export with --page source --csv --print-source sass")
    header, data = rows[header_at], [r for r in rows[header_at + 1 :] if len(r) == len(rows[header_at])]
    col = {h: i for i, h in enumerate(header)}
    reasons = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]
    total = sum(number(r, col[SAMPLES]) for r in data) or 1.0

    def reason_shares(group, n):
        sums = {c: sum(number(r, col[c]) for r in group) for c in reasons}
        group_total = sum(number(r, col[SAMPLES]) for r in group) or 1.0
        ranked = sorted(sums.items(), key=lambda kv: -kv[1])[:n]
        return ", ".join(f"{c[6:]} {v / group_total:.1%}" for c, v in ranked)

    print(f"{len(data)} instructions, {total:.0f} samples; reasons: {reason_shares(data, 8)}")
    # classes of instructions by execution count, rounded to 2 significant digits
    classes = defaultdict(list)
    for r in data:
        executed = number(r, col[EXECUTED])
        if executed > 0:
            classes[float(f"{executed:.2g}")].append(r)
    print("\nby execution count (instructions that ran as often as each other):")
    for executed, group in sorted(classes.items(), key=lambda kv: -sum(number(r, col[SAMPLES]) for r in kv[1]))[:6]:
        share = sum(number(r, col[SAMPLES]) for r in group) / total
        print(f"  ~{executed:.2g} times: {len(group):4d} instructions, {share:6.1%} of samples; {reason_shares(group, 4)}")
    print(f"\nthe {top} most sampled instructions:")
    for r in sorted(data, key=lambda r: -number(r, col[SAMPLES]))[:top]:
        ranked = sorted(((number(r, col[c]), c[6:]) for c in reasons), reverse=True)[:2]
        lead = "  ".join(f"{name} {v / total:.2%}" for v, name in ranked if v > 0)
        print(f"  {r[0][-5:]} {number(r, col[SAMPLES]) / total:6.2%}  {r[1].strip()[:64]:64s} {lead}  ran {number(r, col[EXECUTED]):.0f}")


if __name__ == "__main__":
    main()
