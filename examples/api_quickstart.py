"""The Python API in a few lines: distil-detect a model on bundled GSM8K questions.

    python examples/api_quickstart.py                 # the embedded SmolLM2-135M-Instruct, ~1 min on 2 CPU cores
    python examples/api_quickstart.py ./my-student    # your checkpoint

It scores 8 questions from the training split ("members") against 8 from the test split
("non-members") with TPD and two baselines, prints the metrics table, then audits the
test questions against the training ones as if they were an unseen reference. The base
model has seen neither, so both answers should say "no difference": this shows the calls,
not a contamination.
"""

import sys
import tempfile

import distill_detect as dd

model = sys.argv[1] if len(sys.argv) > 1 else "default"
out = tempfile.mkdtemp(prefix="dd-example-")
gen = dd.GenConfig(max_new_tokens=32, batch_size=8)

res = dd.run("bundled:gsm8k_train_sample", "bundled:gsm8k_test", out=f"{out}/run", model=model,
             methods="tpd,out_ppl,loss", gen=gen, source=dd.QuestionSource(limit=8), bootstrap=200)  # fmt: skip
print(res.table())
print("TPD scores (lower = more member-like):", dict(zip(res.ids[:3], res.raw["tpd"][:3].round(3))))

rep = dd.audit("bundled:gsm8k_test", "bundled:gsm8k_train_sample", out=f"{out}/audit", model=model, gen=gen,
               source=dd.QuestionSource(limit=24), bootstrap=200)  # fmt: skip
print(rep.summary())
print("outputs in", out)
