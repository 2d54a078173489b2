"""``make demo``: the paper's protocol in miniature, on the embedded default model, in minutes.

1. Split bundled GSM8K questions that come with a teacher's solution (GPT-3 175B, correct ones)
   with the paper's protocol: seed 42, 80% members / 20% non-members, balanced evaluation.
2. Distil a student: fine-tune SmolLM2-135M-Instruct on the evaluated members' (question,
   teacher solution) pairs, loss on the solution only.
3. Audit the student: greedy generation with per-token log-probs, TPD and the baselines
   (plus the blind text baseline), TPD's ablations, the metrics table and the HTML report.

Everything is cached and resumable under the cache directory; the results go to ``--out``, with
the members and non-members as question files (``members.jsonl``, ``nonmembers.jsonl``) so the
student can be audited again from the command line (the last lines printed say how).
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import time
from pathlib import Path

DATA = "bundled:gsm8k_gpt3"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo-out", help="results directory (scores, metrics, report, question files)")
    ap.add_argument("--pool", type=int, default=160, help="questions drawn before the 80/20 split (160 -> 32 + 32 evaluated)")
    ap.add_argument("--epochs", type=float, default=5)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch, fine-tuning and generation alike (default: torch's, every core). "
        "On a busy or shared machine 1 is fastest: two threads fighting for one core made the fine-tune 7x slower",
    )
    a = ap.parse_args(argv)
    if a.threads is not None and a.threads < 1:
        ap.error(f"--threads {a.threads}: give a positive number of CPU threads")
    return a


def quiet_bars_unless_terminal(stream=None) -> bool:
    """Silence third-party progress bars (transformers, huggingface_hub, datasets) for the whole process when
    ``stream`` (stderr) is not a terminal, so that logs hold lines, not carriage-return animations. True if silenced."""
    stream = sys.stderr if stream is None else stream
    if stream.isatty():
        return False
    import transformers.utils.logging as hf_logging

    hf_logging.disable_progress_bar()  # also huggingface_hub's
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:  # pragma: no cover - datasets comes with trl (the finetune extra)
        pass
    return True


def split_of(data: str, *, pool_size: int, seed: int, train_on: str = "evaluated"):
    """(members, nonmembers) as ``experiment.student_experiment`` draws and splits them (``experiment.draw_split``),
    without running it: the members the student is trained on (the evaluated ones, or all with
    ``train_on="all"``), and the non-members of the evaluation."""
    from distill_detect.data import load_questions
    from distill_detect.experiment import draw_split

    _, members, nonmembers, _ = draw_split(load_questions(data, require_response=True), pool_size=pool_size, seed=seed)
    return (members[: len(nonmembers)] if train_on == "evaluated" else members), nonmembers


def write_question_files(out: Path, members, nonmembers) -> tuple[Path, Path]:
    """OUT/members.jsonl and OUT/nonmembers.jsonl: id, question and the teacher's response, one question a line."""
    from distill_detect.data import write_jsonl

    paths = Path(out) / "members.jsonl", Path(out) / "nonmembers.jsonl"
    for path, qs in zip(paths, (members, nonmembers)):
        write_jsonl(path, [{"id": q.id, "question": q.text, "response": q.response} for q in qs])
    return paths


def next_commands(student: Path, members: Path, nonmembers: Path, out: Path, max_new_tokens: int) -> list[str]:
    """The one-line commands that audit the demo's student again from the CLI."""
    s, m, n = (shlex.quote(str(p)) for p in (student, members, nonmembers))
    return [
        f"distill-detect run --model {s} --members {m} --nonmembers {n} --out {shlex.quote(str(out / 'rerun'))} "
        f"--max-new-tokens {max_new_tokens}",
        f"distill-detect audit --model {s} --questions {m} --reference {n} --out {shlex.quote(str(out / 'audit'))} "
        f"--max-new-tokens {max_new_tokens}",
    ]


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    quiet_bars_unless_terminal()
    if a.threads is not None:
        import torch

        torch.set_num_threads(a.threads)  # the whole process: fine-tuning, generation and the extra passes

    from distill_detect.detectors import without_samples  # every detector a greedy run can score
    from distill_detect.experiment import say, student_experiment
    from distill_detect.models import cache_dir
    from distill_detect.scoring import format_table

    t0 = time.time()
    cfg = dict(
        data=DATA,
        epochs=a.epochs,
        learning_rate=a.lr,
        batch_size=4,  # 8 optimizer steps per epoch on 32 members: enough for the student to fit them
        max_seq_len=320,
        gen_batch=16,
        train_on="evaluated",
        base="default",
    )
    # --threads does not change the results, so it is not part of the work directory's name.
    work = cache_dir() / "demo" / f"pool{a.pool}-e{a.epochs}-lr{a.lr}-t{a.max_new_tokens}-s{a.seed}"
    say(f"demo: distil SmolLM2-135M-Instruct on GSM8K members, then audit it (work dir {work})")
    res = student_experiment(
        cfg,
        seed=a.seed,
        work=work,
        methods=without_samples(),
        pool_size=a.pool,
        max_new_tokens=a.max_new_tokens,
        ft_overrides={"threads": a.threads} if a.threads else None,
    )
    out = Path(a.out)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(res["out"], out)
    student, members, nonmembers = res["student"], res["members"], res["nonmembers"]  # trained on: the evaluated members
    members_file, nonmembers_file = write_question_files(out, members, nonmembers)
    sizes = res["sizes"]
    print(
        f"\nStudent: SmolLM2-135M-Instruct fine-tuned on {sizes['trained_on']} GSM8K members "
        f"({a.epochs:g} epochs, lr {a.lr:g}, final train loss {res['train'].get('final_train_loss', float('nan')):.3f}); "
        f"audited on {sizes['nonmembers']} members + {sizes['nonmembers']} non-members, {a.max_new_tokens} generated tokens each.\n"
    )
    print(format_table(res["metrics"]))
    print(f"\nscores:  {out / 'scores.jsonl'}\nmetrics: {out / 'metrics.json'}\nreport:  {out / 'report.html'}")
    print(f"student: {student}  (a Hugging Face checkpoint: give it to --model)")
    print(f"members: {members_file} ({len(members)} questions the student was trained on)")
    print(f"non-members: {nonmembers_file} ({len(nonmembers)} questions it never saw)")
    print(
        "\nnext, audit the student yourself:\n  "
        + "\n  ".join(next_commands(student, members_file, nonmembers_file, out, a.max_new_tokens))
    )
    print(f"\ndemo finished in {time.time() - t0:.0f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
