#!/usr/bin/env python3
"""Builds the bundled dataset: splits reasoning-gym's arith_1k.jsonl into train.jsonl (900 rows)
and eval.jsonl (100 rows) with a fixed seed, after checking every answer by evaluating its
expression.

Run from the repository root:  python3 data/make_split.py [PATH_TO_arith_1k.jsonl]
(default ../shared/assets/data/arith_1k.jsonl).
"""

import hashlib
import json
import pathlib
import random
import sys

SEED = 20250307
EVAL_ROWS = 100


def checked(row):
    """The row, after asserting that its answer is its expression's exact integer value."""
    expression = row["question"].removeprefix("Calculate ").removesuffix(".")
    assert set(expression) <= set("0123456789+-*/() "), expression
    value = eval(expression, {"__builtins__": {}})  # digits and operators only, checked above
    assert value == int(row["answer"]), (row, value)
    return {"question": row["question"], "answer": row["answer"]}


def main():
    source = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/assets/data/arith_1k.jsonl")
    raw = source.read_bytes()
    rows = [checked(json.loads(line)) for line in raw.decode().splitlines() if line.strip()]
    random.Random(SEED).shuffle(rows)
    out = pathlib.Path(__file__).resolve().parent
    for name, part in (("eval.jsonl", rows[:EVAL_ROWS]), ("train.jsonl", rows[EVAL_ROWS:])):
        (out / name).write_text("".join(json.dumps(row) + "\n" for row in part))
        print(f"{name}: {len(part)} rows")
    print(f"source sha256 {hashlib.sha256(raw).hexdigest()}")


if __name__ == "__main__":
    main()
