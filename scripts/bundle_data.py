"""Rebuild the question sets shipped inside the package from ../shared/data.

Run once by a maintainer (the outputs are committed); users never need ../shared.
Only MIT-licensed sources are bundled: GSM8K (openai/grade-school-math) and MATH
(Hendrycks et al., via Zhuofeng-Li/math-evaluation-harness). See
distill_detect/datasets/README.md for provenance.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import sys
from pathlib import Path

SRC = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data")
DST = Path(__file__).resolve().parents[1] / "distill_detect" / "datasets"


def _write(name: str, rows: list[dict]) -> None:
    path = DST / name
    # mtime=0 keeps the gzip bytes reproducible from run to run.
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as fh:
        for row in rows:
            fh.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
    print(f"{path.name}: {len(rows)} rows, {path.stat().st_size / 1024:.0f} KiB")


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def main() -> None:
    DST.mkdir(parents=True, exist_ok=True)
    sols = _read(SRC / "gsm8k" / "example_model_solutions.jsonl")
    rows = []
    for i, r in enumerate(sols):
        v = r["175b_verification"]
        if v["is_correct"]:
            rows.append(
                {
                    "id": f"gsm8k-test-{i:04d}",
                    "question": r["question"],
                    "response": v["solution"].strip(),
                    "answer": r["ground_truth"].rsplit("A:", 1)[-1].strip(),
                }
            )
    _write("gsm8k_gpt3.jsonl.gz", rows)

    test = _read(SRC / "gsm8k" / "test.jsonl")
    _write(
        "gsm8k_test.jsonl.gz",
        [
            {"id": f"gsm8k-test-{i:04d}", "question": r["question"], "answer": r["answer"].rsplit("####", 1)[-1].strip()}
            for i, r in enumerate(test)
        ],
    )

    train = _read(SRC / "gsm8k" / "train.jsonl")
    idx = sorted(random.Random(0).sample(range(len(train)), 1000))
    _write(
        "gsm8k_train_sample.jsonl.gz",
        [
            {
                "id": f"gsm8k-train-{i:04d}",
                "question": train[i]["question"],
                "answer": train[i]["answer"].rsplit("####", 1)[-1].strip(),
            }
            for i in idx
        ],
    )

    math = _read(SRC / "math" / "test.jsonl")
    _write(
        "math_test.jsonl.gz",
        [
            {
                "id": f"math-test-{i:04d}",
                "question": r["problem"],
                "response": r["solution"],
                "level": r["level"],
                "type": r["type"],
            }
            for i, r in enumerate(math)
        ],
    )
    for p in sorted(DST.glob("*.jsonl.gz")):
        print(p.name, hashlib.sha256(p.read_bytes()).hexdigest()[:16])


if __name__ == "__main__":
    main()
