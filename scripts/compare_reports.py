#!/usr/bin/env python3
"""Compare two convert report.json files, leaving out what is a timing: prints every other
difference and exits 1 when there is one. Used to show that a refactor keeps the pipeline's
behaviour (`cargo xtask convert --config configs/ci.toml` before and after).

    python3 scripts/compare_reports.py BEFORE/report.json AFTER/report.json
"""
import json
import sys

# Fields that are measured times or speeds (anywhere in the report), not results.
TIMINGS = {"seconds", "wall_seconds", "prefill_tok_s", "decode_tok_s"}


def diff(a, b, path, out):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k in TIMINGS:
                continue
            diff(a.get(k), b.get(k), f"{path}.{k}", out)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            diff(x, y, f"{path}[{i}]", out)
    elif a != b:
        out.append(f"{path}: {json.dumps(a)} -> {json.dumps(b)}")


def main():
    before, after = (json.load(open(p)) for p in sys.argv[1:3])
    out = []
    diff(before, after, "report", out)
    for line in out:
        print(line)
    print(f"{len(out)} difference(s) besides timings")
    sys.exit(1 if out else 0)


if __name__ == "__main__":
    main()
