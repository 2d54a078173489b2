"""Distillation fine-tuning on the tiny random Llama: masking, training, outputs, LoRA, resume after kill -9.

The training runs are small (4 examples, batch 2, a handful of steps) and shared between tests
through module fixtures, so the file stays well under a minute and a half on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from distill_detect.checkpoint_dir import last_complete_checkpoint
from distill_detect.errors import ConfigError, InputError
from distill_detect.finetune import (
    CHECKPOINTS,
    MARKER,
    FinetuneConfig,
    add_cli,
    build_trainer,
    config_from_args,
    encode_example,
    finetune,
)
from distill_detect.types import Question

QUESTIONS = [
    Question(id=f"q{i}", text=f"What is {i} plus {i + 3}?", response=f"{i} + {i + 3} = {2 * i + 3}. The answer is {2 * i + 3}.")
    for i in range(4)
]
# 4 examples, batch 2 -> 2 optimizer steps per epoch, 6 in all.
CFG = FinetuneConfig(epochs=3, learning_rate=3e-3, per_device_batch_size=2, max_seq_len=64, warmup_ratio=0.0, seed=7)


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "model.safetensors"))


def _meta(out) -> dict:
    return json.loads((Path(out) / MARKER).read_text())


def _step_counter():
    """A Trainer callback that counts the optimizer steps taken in this process."""
    from transformers import TrainerCallback

    class Count(TrainerCallback):
        steps = 0

        def on_step_end(self, args, state, control, **kwargs):
            Count.steps += 1

    return Count()


@pytest.fixture(scope="module")
def tok(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def trainer_for(tiny_dir, tmp_path_factory):
    """trl's SFTTrainer (not trained) on some questions: what it would train on is ``trainer.train_dataset``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)

    def make(tok, questions, **cfg):
        config = FinetuneConfig(**{"per_device_batch_size": 2, **cfg})
        return build_trainer(model, tok, questions, config, tmp_path_factory.mktemp("ckpt"))

    return make


@pytest.fixture(scope="module")
def full_run(tiny_dir, tmp_path_factory):
    """One uninterrupted full fine-tune, checkpoints kept (the reference for the resume test)."""
    out = tmp_path_factory.mktemp("ft") / "full"
    t0 = time.time()
    finetune(str(tiny_dir), QUESTIONS, out, replace(CFG, keep_checkpoints=True), progress=False)
    return out, time.time() - t0


# -- configuration ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("epochs", 0),
        ("learning_rate", -1e-5),
        ("lr_scheduler", "cosine_typo"),
        ("warmup_ratio", 1.0),
        ("adam_beta2", 1.0),
        ("per_device_batch_size", 0),
        ("gradient_accumulation_steps", 1.5),
        ("max_seq_len", 4),
        ("lora_dropout", 1.0),
        ("save_steps", 0),
        ("dtype", "fp8"),
        ("seed", -1),
        ("threads", 0),
        ("lora", "yes"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        FinetuneConfig(**{field: value})


def test_config_defaults_follow_the_paper():
    c = FinetuneConfig()
    assert (c.epochs, c.learning_rate, c.lr_scheduler, c.warmup_ratio, c.weight_decay) == (5, 1e-5, "cosine", 0.05, 1e-4)
    assert (c.adam_beta1, c.adam_beta2, c.global_batch_size) == (0.9, 0.95, 8)
    assert "save_steps" not in c.training_key() and "learning_rate" in c.training_key()


def test_module_import_is_light():
    code = "import sys, distill_detect.finetune; assert not {'torch', 'transformers', 'trl', 'datasets'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


# -- data: the loss is on the response only ---------------------------------------------------------------


def _reference_encoding(tok, question, response, max_seq_len, system_prompt=None):
    """The encoding before trl (0.1's encode_example), kept as the specification of what is trained:
    (input_ids, labels) = the generation prompt, masked, then response + end-of-turn cut at max_seq_len."""
    from distill_detect.backends.base import END_OF_TURN
    from distill_detect.prompts import render_with_response

    prompt, full = render_with_response(tok, question, response, system_prompt)
    part = full[len(prompt) :]
    stripped = part.rstrip()
    part = stripped if stripped != part and stripped.endswith(tuple(t for t in (tok.eos_token, *END_OF_TURN) if t)) else part
    prompt_ids = list(tok(prompt, add_special_tokens=False)["input_ids"])
    target = list(tok(part, add_special_tokens=False)["input_ids"])[: max_seq_len - len(prompt_ids)]
    return prompt_ids + target, [-100] * len(prompt_ids) + target


def test_labels_mask_the_prompt_exactly(tok, trainer_for):
    from distill_detect.prompts import build_prompt

    q = QUESTIONS[1]
    ex = trainer_for(tok, [q], max_seq_len=256).train_dataset[0]
    prompt = build_prompt(tok, q.text)
    n = len(prompt.ids)
    # The prompt is tokenised exactly as for generation, and all of it is masked.
    assert ex["input_ids"][:n] == prompt.ids
    assert ex["labels"][:n] == [-100] * n
    # Everything after it is trained, and is the response followed by the end-of-turn token (not the newline after it).
    assert all(x != -100 for x in ex["labels"][n:])
    assert ex["labels"][n:] == ex["input_ids"][n:]
    assert tok.decode(ex["labels"][n:]) == q.response + "<|im_end|>"
    assert encode_example(tok, q.text, q.response)["completion_mask"] == [0] * n + [1] * (len(ex["input_ids"]) - n)


@pytest.mark.parametrize("name, limit, max_seq_len", [("gsm8k_gpt3", None, 320), ("math_test", 400, 384)])  # 320: the demo's
def test_trl_trains_exactly_the_tokens_of_the_reference_encoding_on_bundled_data(tok, trainer_for, name, limit, max_seq_len):
    """trl's input_ids and labels (after its masking and truncation) are the reference encoding's, token for token."""
    from distill_detect.data import load_questions
    from distill_detect.prompts import build_prompt

    qs = load_questions(f"bundled:{name}", require_response=True)[:limit]
    qs = [q for q in qs if len(build_prompt(tok, q.text).ids) < max_seq_len]  # longer prompts are refused (tested below)
    with pytest.warns(UserWarning, match="cut at max_seq_len"):  # at these lengths some are: truncation is compared too
        data = trainer_for(tok, qs, max_seq_len=max_seq_len).train_dataset
    assert len(data) == len(qs)
    n_cut = 0
    for q, ids, labels in zip(qs, data["input_ids"], data["labels"]):
        assert (ids, labels) == _reference_encoding(tok, q.text, q.response, max_seq_len), q.id
        n_prompt = len(build_prompt(tok, q.text).ids)
        assert ids[:n_prompt] == build_prompt(tok, q.text).ids and labels[:n_prompt] == [-100] * n_prompt
        if len(ids) < max_seq_len:
            assert tok.decode(labels[n_prompt:]) == q.response + "<|im_end|>", q.id
        n_cut += len(ids) == max_seq_len
    assert n_cut > 0
    # With a system prompt the masked prompt is the generation prompt with that system turn.
    sys_prompt = "You are a careful tutor."
    data = trainer_for(tok, qs[:20], max_seq_len=max_seq_len, system_prompt=sys_prompt).train_dataset
    for q, ids, labels in zip(qs[:20], data["input_ids"], data["labels"]):
        assert (ids, labels) == _reference_encoding(tok, q.text, q.response, max_seq_len, sys_prompt)
        assert ids[: len(build_prompt(tok, q.text, sys_prompt).ids)] == build_prompt(tok, q.text, sys_prompt).ids


def test_long_response_is_cut_and_prompt_that_fills_the_window_is_refused(tok, trainer_for):
    q = QUESTIONS[0]
    full = trainer_for(tok, [q], max_seq_len=256).train_dataset[0]
    n_prompt = full["labels"].count(-100)
    with pytest.warns(UserWarning, match=r"1 of 1 responses were cut at max_seq_len=\d+ tokens.*'q0'"):
        cut = trainer_for(tok, [q], max_seq_len=n_prompt + 3).train_dataset[0]
    assert len(cut["input_ids"]) == n_prompt + 3
    assert cut["input_ids"] == full["input_ids"][: n_prompt + 3] and cut["labels"] == full["labels"][: n_prompt + 3]
    with pytest.raises(InputError, match=r"question 'q2'.*max_seq_len") as err:
        trainer_for(tok, [QUESTIONS[1], replace(QUESTIONS[2], text=QUESTIONS[2].text * 20)], max_seq_len=n_prompt + 3)
    assert err.value.field == "question"


def test_batches_are_padded_right_with_ignored_labels(tok, trainer_for):
    trainer = trainer_for(tok, QUESTIONS[:2], max_seq_len=256)
    rows = [trainer.train_dataset[0], trainer.train_dataset[1]]
    batch = trainer.data_collator(rows)
    n0, n1 = (len(r["input_ids"]) for r in rows)
    assert batch["input_ids"].shape == (2, max(n0, n1))
    short = 0 if n0 < n1 else 1
    k = len(rows[short]["input_ids"])
    assert batch["attention_mask"][short].tolist() == [1] * k + [0] * (max(n0, n1) - k)
    assert batch["labels"][short, k:].tolist() == [-100] * (max(n0, n1) - k)
    assert batch["input_ids"][short, k:].tolist() == [tok.pad_token_id] * (max(n0, n1) - k)


# -- full fine-tune ---------------------------------------------------------------------------------------


def test_full_finetune_lowers_the_loss_and_records_it(full_run):
    out, _ = full_run
    meta = _meta(out)
    losses = [x["loss"] for x in meta["train"]["losses"]]
    assert [x["step"] for x in meta["train"]["losses"]] == [1, 2, 3, 4, 5, 6]
    assert losses[-1] < losses[0] - 1.0
    assert meta["train"]["final_train_loss"] < losses[0] - 1.0
    assert meta["train"]["global_step"] == 6 and meta["train"]["resumed_from"] is None
    assert meta["config"]["learning_rate"] == 3e-3 and meta["data"]["n_examples"] == 4
    assert meta["base_model"]["identity"]["content_hash"] and meta["data"]["hash"]
    assert meta["train"]["tokens_per_second"] > 0 and meta["package"]["version"]


def test_output_is_a_plain_safetensors_checkpoint_that_generates(full_run, tiny_dir):
    from transformers import AutoModelForCausalLM

    from distill_detect.backends.hf import HFBackend

    out, _ = full_run
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.use_cache
    trained, base = _weights(out), _weights(tiny_dir)
    assert trained.keys() == base.keys()
    assert any(not (trained[k] == base[k]).all() for k in base)
    assert (out / "chat_template.jinja").exists() or "chat_template" in (out / "tokenizer_config.json").read_text()
    # No pickle in what is published (the kept checkpoints hold torch.save optimizer state, loaded weights_only).
    published = [p for p in out.rglob("*") if p.is_file() and CHECKPOINTS not in p.relative_to(out).parts]
    assert not [p for p in published if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    assert not list(out.rglob("training_args.bin"))
    backend = HFBackend(str(out), dtype="float32", device="cpu")
    (trace,) = backend.generate([Question(id="g", text=QUESTIONS[0].text)], max_new_tokens=6)
    assert 1 <= trace.num_tokens <= 6


def test_completed_run_is_returned_without_training_and_other_settings_are_refused(full_run, tiny_dir):
    out, first_time = full_run
    before = (out / MARKER).read_text()
    t0 = time.time()
    assert finetune(str(tiny_dir), QUESTIONS, out, CFG, progress=False) == out
    assert time.time() - t0 < max(first_time / 2, 3.0)
    assert (out / MARKER).read_text() == before
    with pytest.raises(ConfigError, match="learning_rate"):
        finetune(str(tiny_dir), QUESTIONS, out, replace(CFG, learning_rate=1e-3), progress=False)
    with pytest.raises(ConfigError, match="training data"):
        finetune(str(tiny_dir), QUESTIONS[:3], out, CFG, progress=False)


def test_refuses_to_write_into_a_foreign_directory(tiny_dir, tmp_path):
    with pytest.raises(ConfigError, match="base model"):
        finetune(str(tiny_dir), QUESTIONS, tiny_dir, CFG, progress=False)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="does not hold a distill-detect fine-tune"):
        finetune(str(tiny_dir), QUESTIONS, tmp_path, CFG, progress=False, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    with pytest.raises(InputError, match="no response"):
        finetune(str(tiny_dir), [Question(id="x", text="hi")], tmp_path / "new", CFG, progress=False)


# -- LoRA ----------------------------------------------------------------------------------------------


def test_lora_checkpoint_is_merged_and_the_adapter_kept(tiny_dir, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = FinetuneConfig(
        epochs=1, max_steps=3, learning_rate=2e-2, per_device_batch_size=2, max_seq_len=64, lora=True, lora_r=4, seed=1
    )
    out = finetune(str(tiny_dir), QUESTIONS, tmp_path / "lora", cfg, progress=False)
    trained, base = _weights(out), _weights(tiny_dir)
    assert trained.keys() == base.keys()  # merged: no lora_A/lora_B tensors left
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(trained[q], base[q])
    assert torch.equal(trained["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert (out / "adapter" / "adapter_model.safetensors").exists() and (out / "adapter" / "adapter_config.json").exists()
    assert _meta(out)["lora"] == {"adapter_dir": "adapter"}
    # The merged checkpoint computes what base + adapter computes.
    ids = torch.tensor([[1, 42, 314, 2718, 9]])
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), out / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, with_adapter(ids).logits, atol=1e-4, rtol=1e-4)


# -- resume after kill -9 --------------------------------------------------------------------------------

_CHILD = """
import sys, time
from dataclasses import replace
from transformers import TrainerCallback
from distill_detect.finetune import finetune
from distill_detect.types import Question
sys.path.insert(0, {test_dir!r})
from test_finetune import CFG, QUESTIONS

class StallAfterFirstCheckpoint(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == 2:
            print("checkpoint-2 saved", flush=True)
            time.sleep(120)  # the parent kills us here

cfg = replace(CFG, save_steps=2)
finetune({base!r}, QUESTIONS, {out!r}, cfg, progress=False, callbacks=[StallAfterFirstCheckpoint()])
"""


def test_sigkill_then_rerun_resumes_from_the_last_complete_checkpoint(full_run, tiny_dir, tmp_path):
    import torch

    out = tmp_path / "killed"
    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(test_dir=str(Path(__file__).parent), base=str(tiny_dir), out=str(out)))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    child = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.time() + 120
        while not (out / CHECKPOINTS / "checkpoint-2" / "trainer_state.json").exists():
            assert child.poll() is None, child.stderr.read().decode()[-3000:]
            assert time.time() < deadline, "no checkpoint within 120 s"
            time.sleep(0.1)
        child.stdout.readline()  # "checkpoint-2 saved": the save (and our on_save cleanup) has finished
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL
    assert not (out / MARKER).exists() and not (out / "model.safetensors").exists()

    # A kill in the middle of the next save leaves a checkpoint without trainer_state.json: it must be ignored.
    half = out / CHECKPOINTS / "checkpoint-4"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"truncated")
    assert last_complete_checkpoint(out / CHECKPOINTS).name == "checkpoint-2"

    # Resuming with other settings or other data is refused, and leaves the checkpoints alone.
    with pytest.raises(ConfigError, match="interrupted fine-tune.*learning_rate"):
        finetune(str(tiny_dir), QUESTIONS, out, replace(CFG, learning_rate=1e-3), progress=False)
    with pytest.raises(ConfigError, match="training data"):
        finetune(str(tiny_dir), QUESTIONS[::-1], out, CFG, progress=False)
    assert (out / CHECKPOINTS / "checkpoint-2" / "trainer_state.json").exists()

    # The same call again resumes (save_steps may differ: it does not change the weights).
    count = _step_counter()
    finetune(str(tiny_dir), QUESTIONS, out, replace(CFG, save_steps=2), progress=False, callbacks=[count])
    assert count.steps == 4  # steps 3..6 only: it continued rather than restarted
    meta = _meta(out)
    assert meta["train"]["resumed_from"] == {"checkpoint": "checkpoint-2", "global_step": 2}
    assert meta["train"]["global_step"] == 6
    assert [x["step"] for x in meta["train"]["losses"]] == [1, 2, 3, 4, 5, 6]
    assert not (out / CHECKPOINTS).exists()
    # Same seed, same data, CPU: the interrupted run ends where the uninterrupted one did.
    ref, got = _weights(full_run[0]), _weights(out)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-5, rtol=1e-4)
    ref_losses = [x["loss"] for x in _meta(full_run[0])["train"]["losses"]]
    assert [x["loss"] for x in meta["train"]["losses"]] == pytest.approx(ref_losses, rel=1e-4)


def test_kill_during_the_final_save_is_finished_from_the_last_checkpoint(full_run, tiny_dir, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(full_run[0], out)
    # As if killed after the last checkpoint but before the marker (and the weights) were published.
    (out / MARKER).unlink()
    (out / "model.safetensors").unlink()
    count = _step_counter()
    finetune(str(tiny_dir), QUESTIONS, out, CFG, progress=False, callbacks=[count])
    assert count.steps == 0
    meta = _meta(out)
    assert meta["train"]["resumed_from"] == {"checkpoint": "checkpoint-6", "global_step": 6}
    assert meta["train"]["global_step"] == 6
    ref, got = _weights(full_run[0]), _weights(out)
    assert all((ref[k] == got[k]).all() for k in ref)


# -- command line ---------------------------------------------------------------------------------------


def _parser():
    parser = argparse.ArgumentParser(prog="distill-detect")
    add_cli(parser.add_subparsers(dest="command"))
    return parser


def test_cli_options_map_onto_the_config():
    args = _parser().parse_args(
        "finetune --data d.jsonl --out m --epochs 3 --lr 1e-4 --batch-size 2 --grad-accum 4 --max-seq-len 256 "
        "--seed 1 --lora --lora-r 8 --warmup-ratio 0.1 --weight-decay 0 --save-steps 10".split()
    )
    cfg = config_from_args(args)
    assert cfg == FinetuneConfig(
        epochs=3,
        learning_rate=1e-4,
        per_device_batch_size=2,
        gradient_accumulation_steps=4,
        max_seq_len=256,
        seed=1,
        lora=True,
        lora_r=8,
        warmup_ratio=0.1,
        weight_decay=0.0,
        save_steps=10,
    )
    assert config_from_args(_parser().parse_args("finetune --data d --out m".split())) == FinetuneConfig()
    assert args.func.__name__ == "cmd_finetune" and args.model == "default"
    help_text = _parser()._subparsers._group_actions[0].choices["finetune"].format_help()
    assert "distill-detect finetune --data bundled:gsm8k_gpt3" in help_text


def test_every_config_field_has_a_generated_flag_with_its_doc_and_default():
    from dataclasses import fields

    sub = _parser()._subparsers._group_actions[0].choices["finetune"]
    by_dest = {a.dest: a for a in sub._actions}
    for f in fields(FinetuneConfig):
        action = by_dest[f.name]  # one flag per field, its dest the field's name
        assert action.default is None and action.help.startswith(f.metadata["doc"].replace("%", "%%")), f.name
    assert by_dest["learning_rate"].option_strings == ["--lr"] and by_dest["threads"].option_strings == ["--threads"]
    assert by_dest["per_device_batch_size"].option_strings == ["--batch-size"] and by_dest["lora"].nargs == 0
    assert "(default: 0.0001)" in by_dest["weight_decay"].help and "5%" in sub.format_help()
    args = _parser().parse_args(
        "finetune --data d --out m --threads 1 --lr-scheduler linear --dtype float32 --epochs 2.5".split()
    )
    assert config_from_args(args) == FinetuneConfig(threads=1, lr_scheduler="linear", dtype="float32", epochs=2.5)
    with pytest.raises(SystemExit):
        _parser().parse_args("finetune --data d --out m --lr-scheduler cosine_typo".split())
    # threads never changes the weights: it is not part of the run's identity (a resume may use another value)
    assert "threads" not in FinetuneConfig(threads=1).training_key()


def test_cli_trains_from_a_jsonl_file_on_the_given_threads_without_progress_bars_in_a_log(tiny_dir, tmp_path, capfd):
    import torch

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"id": q.id, "question": q.text, "answer": q.response}) + "\n" for q in QUESTIONS))
    out = tmp_path / "student"
    argv = f"finetune --model {tiny_dir} --data {data} --response-field answer --out {out} --max-steps 1 --batch-size 2 --limit 2"
    args = _parser().parse_args(argv.split() + ["--max-seq-len", "64", "--threads", "1"])
    threads = torch.get_num_threads()
    try:
        assert args.func(args) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    meta = _meta(out)
    assert meta["data"]["n_examples"] == 2 and meta["train"]["global_step"] == 1 and meta["config"]["threads"] == 1
    captured = capfd.readouterr()
    assert str(out) in captured.out
    # stderr is not a terminal here: status lines only, no third-party progress bars (tokenizing, saving shards ...)
    assert "Fine-tuning on 2 examples" in captured.err and "Wrote" in captured.err
    assert "%|" not in captured.err and "\r" not in captured.err and "Writing model shards" not in captured.err, captured.err


# -- the demo: --threads, THREADS=, the question files and the next command ---------------------------------


def test_demo_threads_flag_and_make_variable(tmp_path):
    from distill_detect.demo import parse_args

    assert parse_args([]).threads is None and parse_args(["--threads", "1"]).threads == 1
    with pytest.raises(SystemExit):
        parse_args(["--threads", "0"])
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    root = Path(__file__).resolve().parents[1]

    def demo_line(*variables):  # make -n prints the recipe without running it (VENV: a folder that does not exist)
        cmd = ["make", "-n", "-C", str(root), "demo", f"VENV={tmp_path / 'venv'}", *variables]
        lines = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()
        return next(x for x in lines if "-m distill_detect.demo" in x)

    assert demo_line("THREADS=1").endswith("-m distill_detect.demo --out demo-out --threads 1")
    assert "--threads" not in demo_line()


def test_demo_writes_the_split_as_question_files_and_prints_commands_that_parse(tmp_path):
    import shlex

    from distill_detect.cli import build_parser
    from distill_detect.data import load_questions
    from distill_detect.demo import DATA, next_commands, split_of, write_question_files

    members, nonmembers = split_of(DATA, pool_size=160, seed=42)
    assert len(members) == len(nonmembers) == 32 and not {q.id for q in members} & {q.id for q in nonmembers}
    m_file, n_file = write_question_files(tmp_path, members[:3], nonmembers[:2])
    assert (m_file.name, n_file.name) == ("members.jsonl", "nonmembers.jsonl")
    back = load_questions(str(m_file), require_response=True)
    assert [(q.id, q.text, q.response) for q in back] == [(q.id, q.text, q.response) for q in members[:3]]
    assert [q.id for q in load_questions(str(n_file))] == [q.id for q in nonmembers[:2]]
    run, audit = next_commands(tmp_path / "my student", m_file, n_file, tmp_path, 64)
    a = build_parser().parse_args(shlex.split(run)[1:])
    assert (a.command, a.model, a.members, a.nonmembers) == ("run", str(tmp_path / "my student"), str(m_file), str(n_file))
    a = build_parser().parse_args(shlex.split(audit)[1:])
    assert (a.command, a.questions, a.reference, a.max_new_tokens) == ("audit", str(m_file), str(n_file), 64)


def test_demo_silences_third_party_progress_bars_when_stderr_is_not_a_terminal():
    import io

    import datasets
    import transformers.utils.logging as hf_logging

    from distill_detect.demo import quiet_bars_unless_terminal

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    was = hf_logging.is_progress_bar_enabled(), datasets.is_progress_bar_enabled()
    try:
        hf_logging.enable_progress_bar()
        datasets.enable_progress_bars()
        assert quiet_bars_unless_terminal(Terminal()) is False and hf_logging.is_progress_bar_enabled()
        assert quiet_bars_unless_terminal(io.StringIO()) is True
        assert not hf_logging.is_progress_bar_enabled() and not datasets.is_progress_bar_enabled()
    finally:
        (hf_logging.enable_progress_bar if was[0] else hf_logging.disable_progress_bar)()
        (datasets.enable_progress_bars if was[1] else datasets.disable_progress_bars)()


# -- the output-folder rules and the progress bars, without training -----------------------------------------


def test_checkpoint_dir_one_writer_marker_last_and_same_run_or_nothing(tmp_path):
    from distill_detect.checkpoint_dir import CheckpointDir

    def job():
        return CheckpointDir(tmp_path / "o", marker="done.json", run_file="run.json", what="job")

    run = {"config": {"lr": 1}, "data_hash": "abc", "n_examples": 2}
    d = job()
    with d.lock():
        with pytest.raises(ConfigError, match="another job is writing"), job().lock():
            pass
        assert d.claim(run) is None and d.resume_point() == (None, {})
        (d.checkpoints / "checkpoint-3").mkdir()  # cut short: no trainer_state.json
        staging = d.staging()
        (staging / "w.safetensors").write_text("w")
        d.publish(staging, {**d.marker_head(), **d.marker_tail(["pytest"])})
    assert (d.path / "w.safetensors").read_text() == "w" and not staging.exists()
    with job().lock() as again:
        assert again.claim(run)["run_key"] == d.key
        with pytest.raises(ConfigError, match=r"completed job with different settings \(lr: 1 -> 2\)"):
            again.claim({**run, "config": {"lr": 2}})
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="does not hold a distill-detect job"):
        CheckpointDir(tmp_path / "foreign", marker="done.json", what="job").lock().__enter__()


def test_transformers_bars_are_silenced_in_the_gguf_conversion_when_stderr_is_not_a_terminal(capfd):
    """What the first use of the embedded model runs (its save: 'Writing model shards') prints no bar into a log."""
    import transformers.utils.logging as hf_logging
    from tqdm.auto import tqdm

    from distill_detect.models import progress_bars_on_terminal_only, quiet_progress_bars

    was = hf_logging.is_progress_bar_enabled()
    try:
        hf_logging.enable_progress_bar()
        with quiet_progress_bars(False):
            assert not hf_logging.is_progress_bar_enabled()
        assert hf_logging.is_progress_bar_enabled()  # restored
        capfd.readouterr()
        with progress_bars_on_terminal_only():  # stderr is captured here: not a terminal
            for _ in hf_logging.tqdm(range(3), desc="Writing model shards"):
                pass
            for _ in tqdm(range(3), desc="Converting and de-quantizing GGUF tensors"):  # tqdm used directly
                pass
        err = capfd.readouterr().err
        assert "Writing model shards" not in err and "de-quantizing" not in err and "\r" not in err, err
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()
