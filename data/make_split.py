#!/usr/bin/env python3
"""Builds the bundled dataset from reasoning-gym's arith_1k.jsonl: keeps the questions with a
single binary operation (a model of 135M parameters can learn those; longer chains it cannot),
each question once, checks every answer by evaluating its expression, shuffles with a fixed seed and writes the
first 100 rows to eval.jsonl and the rest to train.jsonl.

Run from the repository root:  python3 data/make_split.py [PATH_TO_arith_1k.jsonl]
(default ../shared/assets/data/arith_1k.jsonl).
"""

import hashlib
import json
import pathlib
import random
import re
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


def binary_operations(question):
    """Binary operators in the expression: one that follows a digit or a closing parenthesis
    (a leading or parenthesised minus is a sign)."""
    expression = question.removeprefix("Calculate ").removesuffix(".")
    return len(re.findall(r"(?<=[0-9)]) [-+*/] ", expression))


def main():
    source = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/assets/data/arith_1k.jsonl")
    raw = source.read_bytes()
    rows = [checked(json.loads(line)) for line in raw.decode().splitlines() if line.strip()]
    rows = [row for row in rows if binary_operations(row["question"]) == 1]
    rows = list({row["question"]: row for row in rows}.values())  # each question once
    random.Random(SEED).shuffle(rows)
    out = pathlib.Path(__file__).resolve().parent
    for name, part in (("eval.jsonl", rows[:EVAL_ROWS]), ("train.jsonl", rows[EVAL_ROWS:])):
        (out / name).write_text("".join(json.dumps(row) + "\n" for row in part))
        print(f"{name}: {len(part)} rows")
    print(f"source sha256 {hashlib.sha256(raw).hexdigest()}")


if __name__ == "__main__":
    main()
