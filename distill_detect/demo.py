"""``make demo``: the main job on the embedded default model, end to end, in a few minutes.

Audits SmolLM2-135M-Instruct with TPD on bundled GSM8K questions: train-split questions
(plausibly in the model's instruction-tuning data) as "members" against test-split
questions as "non-members". A stock model has not been distilled on either, so this
shows the machinery, not a detection; the numbers are printed as they come.
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    from distill_detect.cli import main as cli_main

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="demo-out")
    ap.add_argument("--limit", type=int, default=40, help="questions per side")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    a = ap.parse_args(argv)
    t0 = time.time()
    rc = cli_main(
        [
            "run",
            "--members",
            "bundled:gsm8k_train_sample",
            "--nonmembers",
            "bundled:gsm8k_test",
            "--limit",
            str(a.limit),
            "--max-new-tokens",
            str(a.max_new_tokens),
            "--batch-size",
            "8",
            "--out",
            a.out,
        ]
    )
    print(f"\ndemo finished in {time.time() - t0:.0f}s", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
