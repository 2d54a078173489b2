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

from distill_detect.errors import ConfigError, InputError
from distill_detect.finetune import (
    CHECKPOINTS,
    MARKER,
    FinetuneConfig,
    ResponseOnlyCollator,
    add_cli,
    config_from_args,
    encode_example,
    finetune,
    last_complete_checkpoint,
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
    code = "import sys, distill_detect.finetune; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# -- data: the loss is on the response only ---------------------------------------------------------------


def test_labels_mask_the_prompt_exactly(tok):
    from distill_detect.prompts import build_prompt

    q = QUESTIONS[1]
    ex = encode_example(tok, q.text, q.response, max_seq_len=256)
    prompt = build_prompt(tok, q.text)
    n = len(prompt.ids)
    # The prompt is tokenised exactly as for generation, and all of it is masked.
    assert ex["input_ids"][:n] == prompt.ids
    assert ex["labels"][:n] == [-100] * n
    # Everything after it is trained, and is the response followed by the end-of-turn token (not the newline after it).
    assert all(x != -100 for x in ex["labels"][n:])
    assert ex["labels"][n:] == ex["input_ids"][n:]
    assert tok.decode(ex["labels"][n:]) == q.response + "<|im_end|>"
    assert not ex["truncated"]


def test_long_response_is_cut_and_prompt_that_fills_the_window_is_refused(tok):
    q = QUESTIONS[0]
    full = encode_example(tok, q.text, q.response, max_seq_len=256)
    n_prompt = full["labels"].count(-100)
    cut = encode_example(tok, q.text, q.response, max_seq_len=n_prompt + 3)
    assert cut["truncated"] and len(cut["input_ids"]) == n_prompt + 3
    assert cut["input_ids"] == full["input_ids"][: n_prompt + 3]
    with pytest.raises(InputError, match="max_seq_len"):
        encode_example(tok, q.text, q.response, max_seq_len=n_prompt)


def test_collator_pads_right_with_ignored_labels():
    coll = ResponseOnlyCollator(pad_id=0)
    batch = coll([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert coll.tokens_seen == 4


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


def test_cli_trains_from_a_jsonl_file(tiny_dir, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"id": q.id, "question": q.text, "answer": q.response}) + "\n" for q in QUESTIONS))
    out = tmp_path / "student"
    argv = f"finetune --model {tiny_dir} --data {data} --response-field answer --out {out} --max-steps 1 --batch-size 2 --limit 2"
    args = _parser().parse_args(argv.split() + ["--max-seq-len", "64"])
    assert args.func(args) == 0
    meta = _meta(out)
    assert meta["data"]["n_examples"] == 2 and meta["train"]["global_step"] == 1
    assert str(out) in capsys.readouterr().out
