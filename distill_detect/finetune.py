"""Distil a student: supervised fine-tuning on (question, response) pairs, loss on the response only, with trl.

The paper's recipe (../shared/PAPER.md): the teacher's response goes in the assistant turn of the student's
own chat template, the question in the user turn; the loss is on the response and the end-of-turn token only.
trl's ``SFTTrainer`` does the work: prompt-completion examples with ``completion_only_loss`` (prompt and
padding get the label -100), truncation, padding, the loss (without materialising the full logits), LoRA
through peft, checkpoints and resume. It gets token ids (its tokenized prompt-completion form, ``input_ids`` +
``completion_mask``), not text: the prompt must be exactly the tokens ``prompts.build_prompt`` gives at
generation time, since the audit reads the student's probabilities on it, and trl's text path cannot promise
that (it tokenizes with the tokenizer's default special tokens: a second BOS where the template renders one,
as Llama 3, Mistral, Gemma do; it appends the EOS to a completion not ending with it, as with Gemma and
Phi-3, whose end-of-turn is not the EOS; and it tokenizes prompt + completion together).

Contract of ``finetune`` (and ``distill-detect finetune``): OUT is an ordinary Hugging Face checkpoint
(config.json, model.safetensors, tokenizer with its chat template) that ``--model`` accepts everywhere; a LoRA
adapter is merged into it and kept on its own in OUT/adapter/. OUT/distill_detect_finetune.json (config, base
model identity, data hash, losses, tokens/s, versions) is written last: its presence means the run completed.
Trainer checkpoints go to OUT/checkpoints/: the same call again after an interruption (Ctrl-C, kill -9)
resumes from the last complete one; a finished OUT is returned as is; other settings, base model or data are
refused unless ``overwrite``. Only safetensors and JSON remain at the end: the optimizer, scheduler and RNG
state the Trainer keeps meanwhile (``torch.save``) is read back with ``torch.load(weights_only=True)``, the
pickled training_args.bin is deleted as soon as it appears, OUT/checkpoints/ is removed unless kept.
torch, transformers, trl and peft are imported inside functions, so importing this module stays instant.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from distill_detect.backends.base import END_OF_TURN
from distill_detect.errors import ConfigError, DistillDetectError, InputError, require
from distill_detect.types import Question

MARKER = "distill_detect_finetune.json"  # written last into OUT: the fine-tune completed
CHECKPOINTS = "checkpoints"  # OUT/checkpoints/: the Trainer's checkpoints while it runs
RUN_FILE = "distill_detect_run.json"  # OUT/checkpoints/RUN_FILE: what the interrupted run was
ADAPTER_DIR = "adapter"  # OUT/adapter/: the LoRA adapter on its own
_LOCK, _TMP = ".distill_detect_finetune.lock", ".final-"
_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt")
_DTYPES = ("auto", "float32", "bfloat16", "float16")
_NOT_IN_KEY = ("save_steps", "save_total_limit", "keep_checkpoints", "threads")  # may change between a run and its resume


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _opt(default, check, doc: str, *, flag=None, choices=None, sft=None, group="training"):
    """A field written once: default, (check, fix), doc = its --help, CLI flag, SFTConfig name (True: the same)."""
    check = (lambda v: v in choices, f"choose one of {', '.join(choices)}") if choices else check
    return field(default=default, metadata=dict(check=check, doc=doc, flag=flag, choices=choices, sft=sft, group=group))


_POS, _NONNEG = (lambda v: _num(v) and v > 0, "give a positive number"), (lambda v: _num(v) and v >= 0, "give a value >= 0")
_FRACTION = (lambda v: _num(v) and 0 <= v < 1, "give a value in [0, 1)")
_POS_INT = (lambda v: _int(v) and v >= 1, "give a positive integer")
_POS_INT_OR_NONE = (lambda v: v is None or (_int(v) and v >= 1), "give a positive integer, or None for the default")
_BOOL = (lambda v: isinstance(v, bool), "give True or False")
_LR = (lambda v: _num(v) and 0 < v < 1, "give a value in (0, 1), e.g. 1e-5 (paper) or 1e-4 (small models)")
_SEQ = (lambda v: _int(v) and v >= 16, "give an integer >= 16 that fits a prompt and its response, e.g. 1024")
_STR_OR_NONE = (lambda v: v is None or isinstance(v, str), "give a string, or None for the template's default")
_MODULES = (lambda v: isinstance(v, str) and bool(v.strip()), "give 'all-linear' or module names such as 'q_proj,v_proj'")


@dataclass(frozen=True)
class FinetuneConfig:
    """How a student is distilled; defaults follow the paper's recipe unless noted. Each field's doc is its --help.

    The paper fine-tunes 7B-32B models fully, in bf16, for 5 epochs at learning rate 1e-5. A 135M model trained
    on a few dozen examples barely moves at 1e-5: to make a small student memorise its distillation data on a
    CPU, raise ``learning_rate`` to about 1e-4 (see the README); LoRA usually needs 1e-4 to 2e-4 as well.
    """

    # fmt: off
    epochs: float = _opt(5, _POS, "passes over the training data (paper: 5); fractions are allowed", sft="num_train_epochs")
    learning_rate: float = _opt(1e-5, _LR, "peak AdamW learning rate (paper: 1e-5; small models need ~1e-4)", flag="--lr", sft=True)
    lr_scheduler: str = _opt("cosine", None, "schedule after warm-up (paper: cosine)", choices=_SCHEDULERS, sft="lr_scheduler_type")
    warmup_ratio: float = _opt(0.05, _FRACTION, "fraction of the optimizer steps for a linear warm-up from 0 (paper: 5%)")
    weight_decay: float = _opt(1e-4, _NONNEG, "AdamW decoupled weight decay (paper: 1e-4)", sft=True)
    adam_beta1: float = _opt(0.9, _FRACTION, "AdamW beta1 (paper: 0.9)", sft=True)
    adam_beta2: float = _opt(0.95, _FRACTION, "AdamW beta2 (paper: 0.95)", sft=True)
    max_grad_norm: float = _opt(1.0, _NONNEG, "gradient clipping by global norm, 0 = off (the paper does not say)", sft=True)
    per_device_batch_size: int = _opt(8, _POS_INT, "examples per forward pass; out of memory: lower it, raise --grad-accum",
                                      flag="--batch-size", sft="per_device_train_batch_size")
    gradient_accumulation_steps: int = _opt(1, _POS_INT, "forward passes per optimizer step (global batch = batch size x this; "
                                            "paper: 8)", flag="--grad-accum", sft=True)
    max_seq_len: int = _opt(1024, _SEQ, "tokens per example (prompt + response + end-of-turn); longer responses are cut, "
                            "with a warning; a prompt that leaves no room is an error naming the question")
    max_steps: int | None = _opt(None, _POS_INT_OR_NONE, "stop after N optimizer steps instead of after the epochs")
    seed: int = _opt(42, (lambda v: _int(v) and v >= 0, "give a non-negative integer"), "seeds data order, LoRA init, dropout", sft=True)
    dtype: str = _opt("auto", None, "compute precision: float32, or bfloat16/float16 mixed precision over float32 weights; auto = "
                      "bfloat16 on a GPU that has it, else float32 (paper: bf16; slower on CPUs)", choices=_DTYPES)
    save_dtype: str = _opt("float32", None, "precision of the saved weights (bfloat16 halves the size but can round away "
                           "updates as small as lr 1e-5 makes)", choices=_DTYPES[1:])
    gradient_checkpointing: bool = _opt(False, _BOOL, "recompute activations in the backward pass: less memory, ~30% slower")
    system_prompt: str | None = _opt(None, _STR_OR_NONE, "system turn of the prompts (default: the template's); audit with it too")
    threads: int | None = _opt(None, _POS_INT_OR_NONE, "CPU threads for torch (default: torch's); 1 is fastest on a shared core")
    lora: bool = _opt(False, _BOOL, "train a LoRA adapter, merged into the saved weights (the paper trains fully)", group="LoRA")
    lora_r: int = _opt(16, _POS_INT, "LoRA rank", group="LoRA")
    lora_alpha: float = _opt(32, _POS, "LoRA scaling numerator (updates are scaled by lora_alpha / lora_r)", group="LoRA")
    lora_dropout: float = _opt(0.05, _FRACTION, "dropout on the LoRA branch's input", group="LoRA")
    lora_target_modules: str = _opt("all-linear", _MODULES, "'all-linear' (all but the output head) or names, e.g. q_proj,v_proj",
                                    group="LoRA")
    save_steps: int | None = _opt(None, _POS_INT_OR_NONE, "checkpoint every N optimizer steps (default: each epoch)", group="checkpoints")
    save_total_limit: int = _opt(1, _POS_INT, "checkpoints kept while training (the newest)", sft=True, group="checkpoints")
    keep_checkpoints: bool = _opt(False, _BOOL, "keep OUT/checkpoints/ (optimizer state) at the end", group="checkpoints")
    # fmt: on

    def __post_init__(self) -> None:
        for f in fields(self):
            ok, fix = f.metadata["check"]
            if not ok(getattr(self, f.name)):
                raise ConfigError(f"{f.name} = {getattr(self, f.name)!r} is not valid: {fix}")

    @property
    def global_batch_size(self) -> int:
        """Examples per optimizer step on one device."""
        return self.per_device_batch_size * self.gradient_accumulation_steps

    def training_key(self) -> dict:
        """The settings that change the trained weights (compared when resuming)."""
        return {k: v for k, v in asdict(self).items() if k not in _NOT_IN_KEY}


def data_hash(questions: list[Question]) -> str:
    """sha256 over the ordered (id, question, response) triples (order changes the data order, hence the weights)."""
    h = hashlib.sha256()
    for q in questions:
        h.update(json.dumps([q.id, q.text, q.response], ensure_ascii=False).encode("utf-8") + b"\n")
    return h.hexdigest()[:24]


def encode_example(tokenizer, question: str, response: str, system_prompt: str | None = None) -> dict:
    """An example in trl's tokenized prompt-completion form: the prompt exactly as ``build_prompt`` tokenises it
    for generation, then response + end-of-turn (without whitespace a template puts after the end-of-turn)."""
    from distill_detect.prompts import render_with_response

    prompt, full = render_with_response(tokenizer, question, response, system_prompt)
    part = full[len(prompt) :]
    if part.rstrip() != part and part.rstrip().endswith(tuple(t for t in (tokenizer.eos_token, *END_OF_TURN) if t)):
        part = part.rstrip()
    p, c = (list(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in (prompt, part))
    return {"input_ids": p + c, "completion_mask": [0] * len(p) + [1] * len(c)}


def build_trainer(model, tok, questions, config: FinetuneConfig, ckpt_dir, *, max_len=None, show_bar=False, callbacks=()):
    """trl's SFTTrainer on ``questions``; ``trainer.train_dataset`` holds the examples as trained (labels, truncation)."""
    transformers, trl = require("transformers", "finetune", "Fine-tuning"), require("trl", "finetune", "Fine-tuning")
    from datasets import Dataset
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    max_len, rows, cut = max_len or config.max_seq_len, [], []
    for q in questions:
        rows.append(encode_example(tok, q.text, q.response, config.system_prompt))
        if (n := rows[-1]["completion_mask"].count(0)) >= max_len:
            why = f"the prompt is {n} tokens, which leaves no room for the response within max_seq_len={max_len}"
            raise InputError(f"question {q.id!r}", why + "; raise --max-seq-len or drop this question", field="question")
        cut += [repr(q.id)] if len(rows[-1]["input_ids"]) > max_len else []
    if cut:
        which = ", ".join(cut[:5]) + (", ..." if len(cut) > 5 else "")
        msg = f"{len(cut)} of {len(rows)} responses were cut at max_seq_len={max_len} tokens, their end not trained ({which})"
        warnings.warn(msg + "; raise --max-seq-len to train them whole", stacklevel=3)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if pad_id is None:
        raise DistillDetectError("the tokenizer has neither a pad nor an EOS token; cannot pad training batches")
    dtype, device = _resolve_precision(config)
    same = {f.name if f.metadata["sft"] is True else f.metadata["sft"]: getattr(config, f.name) for f in fields(config) if f.metadata["sft"]}  # fmt: skip
    names = {
        f.name for f in fields(trl.SFTConfig)
    }  # transformers 5 renamed gradient_checkpointing; a warmup_steps < 1 is a ratio
    version_kw = {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": config.gradient_checkpointing,
                  "warmup_ratio" if "warmup_ratio" in names else "warmup_steps": config.warmup_ratio}  # fmt: skip
    args = trl.SFTConfig(**same, **version_kw, max_steps=config.max_steps or -1, data_seed=config.seed, optim="adamw_torch",
                         save_strategy="epoch" if config.save_steps is None else "steps", save_steps=config.save_steps or 500,
                         bf16=dtype == "bfloat16", fp16=dtype == "float16", use_cpu=device == "cpu", output_dir=str(ckpt_dir),
                         max_length=max_len, completion_only_loss=True, include_num_input_tokens_seen="non_padding",
                         logging_steps=1, report_to="none", disable_tqdm=not show_bar, dataloader_num_workers=0)  # fmt: skip

    class NoPickleArgs(transformers.TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            (Path(args.output_dir) / f"checkpoint-{state.global_step}" / "training_args.bin").unlink(missing_ok=True)

    class LossBar(transformers.trainer_callback.ProgressCallback):  # a bar with the loss on it, not a dict per step
        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.training_bar is not None and logs and "loss" in logs:
                self.training_bar.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)

    collator = DataCollatorForLanguageModeling(pad_token_id=pad_id)  # passing ours: trl leaves the pad tokens alone
    trainer = trl.SFTTrainer(
        model, args, collator, Dataset.from_list(rows), processing_class=tok, callbacks=[NoPickleArgs(), *callbacks]
    )
    for cb in (transformers.trainer_callback.PrinterCallback, transformers.trainer_callback.ProgressCallback):
        trainer.remove_callback(cb)
    if show_bar:
        trainer.add_callback(LossBar())
    trainer.responses_cut = len(cut)
    return trainer


def mean_loss(trainer, model) -> float:
    """Token-weighted mean cross-entropy of ``model`` over the trained (response) tokens of the trainer's data."""
    import torch

    data, bs, total, count = trainer.train_dataset, trainer.args.per_device_train_batch_size, 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(data), bs):
            batch = trainer.data_collator([data[j] for j in range(i, min(i + bs, len(data)))])
            out = model(**{k: v.to(trainer.args.device) for k, v in batch.items()}, fused_lm_head=True)  # trl's LM head
            total, count = total - float(out.log_probs.sum()), count + int(out.label_mask.sum())
    return total / count if count else float("nan")


def _resolve_precision(config: FinetuneConfig) -> tuple[str, str]:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = config.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if device == "cpu" and dtype == "float16":
        raise ConfigError("dtype = 'float16' needs a GPU; use float32 or bfloat16 on a CPU")
    return dtype, device


@contextmanager
def quiet_progress_bars(show: bool):
    """Silence transformers', huggingface_hub's and datasets' progress bars inside, unless ``show`` (on a terminal)."""
    hf_logging, datasets = require("transformers.utils.logging", "hf", "Progress bars"), require("datasets", "finetune", "trl")
    was = hf_logging.is_progress_bar_enabled(), datasets.is_progress_bar_enabled()
    if not show:
        hf_logging.disable_progress_bar()
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was[0] else hf_logging.disable_progress_bar)()
        (datasets.enable_progress_bars if was[1] else datasets.disable_progress_bars)()


# -- output directory bookkeeping ------------------------------------------------------------------


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_json_atomic(path: Path, obj: dict) -> None:
    with open(path.with_name(path.name + ".tmp"), "w", encoding="utf-8") as fh:
        fh.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(fh.name, path)


def _remove(p: Path) -> None:
    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def _differences(old: dict, new: dict) -> str:
    a, b = old.get("config", {}), new.get("config", {})
    diffs = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if old.get("data_hash") != new.get("data_hash"):
        n, h = "n_examples", "data_hash"
        diffs.append(f"training data: {old.get(n)} examples (hash {old.get(h)}) -> {new.get(n)} (hash {new.get(h)})")
    if old.get("base_model") != new.get("base_model"):
        diffs.append(f"base model: {old.get('base_model')} -> {new.get('base_model')}")
    return "; ".join(diffs) or "unknown"


def _step(p: Path) -> int:
    head, _, n = p.name.partition("-")
    return int(n) if head == "checkpoint" and n.isdigit() and p.is_dir() else -1


def last_complete_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest ``checkpoint-N`` whose save finished (the Trainer writes ``trainer_state.json`` last), else None."""
    done = [p for p in Path(ckpt_dir).glob("checkpoint-*") if _step(p) >= 0 and (p / "trainer_state.json").exists()]
    return max(done, key=_step) if done else None


def _claim(out: Path, run: dict, run_key: str, overwrite: bool, progress: bool) -> bool:
    """Under the lock: refuse a different run, clear for --overwrite, drop cut-short saves. True: already complete."""
    done, old = _read_json(out / MARKER), _read_json(out / CHECKPOINTS / RUN_FILE)
    if done is not None and not overwrite:
        if done.get("run_key") != run_key:
            raise ConfigError(f"{out} holds a completed fine-tune with different settings ({_differences(done.get('run', {}), run)}); "
                              "choose another --out, or pass --overwrite to replace it")  # fmt: skip
        if not done.get("config", {}).get("keep_checkpoints", True):  # killed while removing them
            shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
        return True
    if overwrite and any(p.name != _LOCK for p in out.iterdir()):
        _say(progress, f"--overwrite: removing the previous fine-tune in {out}")
        for p in (p for p in out.iterdir() if p.name != _LOCK):
            _remove(p)
        old = None
    if old is not None and old.get("run_key") != run_key:
        raise ConfigError(f"{out} holds an interrupted fine-tune with different settings ({_differences(old, run)}); re-run with "
                          "the original settings to resume it, choose another --out, or pass --overwrite to start over")  # fmt: skip
    (out / CHECKPOINTS).mkdir(exist_ok=True)
    for p in [*out.glob(_TMP + "*"), *(out / CHECKPOINTS).glob("checkpoint-*")]:
        if p.parent == out or not (p / "trainer_state.json").exists():  # a final save or a checkpoint cut short
            shutil.rmtree(p, ignore_errors=True)
    if old is None:
        _write_json_atomic(out / CHECKPOINTS / RUN_FILE, {**run, "run_key": run_key})
    return False


# -- the fine-tune -----------------------------------------------------------------------------------


def finetune(base_model, questions: list[Question], out_dir, config: FinetuneConfig | None = None, *,
             progress: bool = True, overwrite: bool = False, callbacks: list | None = None) -> Path:  # fmt: skip
    """Fine-tune ``base_model`` on the (question, response) pairs and write a checkpoint to ``out_dir``; returns it.

    ``base_model``: None or 'default' (the embedded SmolLM2-135M-Instruct), a checkpoint directory or a hub id.
    ``questions``: each needs a non-empty ``response`` (the teacher trace). ``progress``: status lines on stderr,
    and progress bars when it is a terminal; False: silent. ``overwrite``: replace a previous or interrupted
    fine-tune in ``out_dir`` instead of returning or resuming it. ``callbacks``: extra ``TrainerCallback`` objects.
    """
    import fcntl

    from distill_detect.models import resolve_model

    config = config or FinetuneConfig()
    if not isinstance(config, FinetuneConfig):
        raise ConfigError(f"config must be a FinetuneConfig, got {type(config).__name__}")
    if not (questions := list(questions)):
        raise ConfigError("no training examples: give at least one question with a response")
    for q in questions:
        if not (isinstance(q.response, str) and q.response.strip()):
            raise InputError("training data", f"question {q.id!r} has no response to train on", field="response")
    out, t_start = Path(out_dir).expanduser(), time.time()
    with quiet_progress_bars(progress and sys.stderr.isatty()):
        ref = resolve_model(base_model)  # may convert the embedded GGUF (once): its save bar is silenced too
        run = {"config": config.training_key(), "data_hash": data_hash(questions), "n_examples": len(questions)}
        run["base_model"] = dict(ref.identity)
        run_key = hashlib.sha256(json.dumps(run, sort_keys=True).encode()).hexdigest()[:24]
        where = f"--out {str(out)!r}"
        if out.exists() and not out.is_dir():
            raise ConfigError(f"{where} is a file; give a directory for the fine-tuned checkpoint")
        if Path(ref.location).exists() and out.resolve() == Path(ref.location).resolve():
            raise ConfigError(f"{where} is the base model's own directory; choose a new directory")
        ours = (out / MARKER).exists() or (out / CHECKPOINTS / RUN_FILE).exists()
        if out.exists() and not ours and any(p.name not in (CHECKPOINTS, _LOCK) and not p.name.startswith(_TMP) for p in out.iterdir()):  # fmt: skip
            raise ConfigError(f"{where} exists and does not hold a distill-detect fine-tune; choose a new or empty directory")
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the output directory {str(out)!r} ({exc.strerror}); choose a writable --out") from None  # fmt: skip
        if not os.access(out, os.W_OK):
            raise ConfigError(f"the output directory {str(out)!r} is not writable; choose a writable --out")
        with open(out / _LOCK, "a") as lock:  # released by the OS if the process dies
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ConfigError(f"another fine-tune is writing to {out}; wait for it to finish or choose another --out") from None  # fmt: skip
            if _claim(out, run, run_key, overwrite, progress):
                _say(progress, f"{out} already holds this fine-tune (completed); nothing to do")
                return out
            resume = last_complete_checkpoint(out / CHECKPOINTS)
            return _train(ref, questions, out, config, run, run_key, resume, progress, callbacks or [], t_start)


def _train(ref, questions, out, config, run, run_key, resume, progress, callbacks, t_start) -> Path:
    """Load, train with trl (resuming from ``resume`` when given), save atomically, write the marker."""
    from distill_detect import __version__
    from distill_detect.models import load_hf

    torch, transformers = require("torch", "finetune", "Fine-tuning"), require("transformers", "finetune", "Fine-tuning")
    if config.threads:
        torch.set_num_threads(config.threads)
    ckpt_dir, (dtype, device) = out / CHECKPOINTS, _resolve_precision(config)
    _say(progress, f"Loading {ref.spec} ...")
    model, tok, _, _ = load_hf(ref, dtype="float32", device="cpu")
    max_len, context = config.max_seq_len, int(getattr(model.config, "max_position_embeddings", 0) or 0)
    if context and max_len > context:
        warnings.warn(f"max_seq_len={max_len} exceeds the model's context ({context}); using {context}", stacklevel=3)
        max_len = context
    transformers.set_seed(config.seed)
    model.config.use_cache = False
    if config.lora:
        peft, targets = require("peft", "finetune", "LoRA fine-tuning"), config.lora_target_modules.strip()
        names = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
        lora = peft.LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                               target_modules=names, task_type="CAUSAL_LM")  # fmt: skip
        try:
            model = peft.get_peft_model(model, lora)
        except ValueError as exc:
            raise ConfigError(f"lora_target_modules = {targets!r}: {str(exc).splitlines()[0]}") from None
    show_bar = progress and sys.stderr.isatty()
    trainer = build_trainer(model, tok, questions, config, ckpt_dir, max_len=max_len, show_bar=show_bar, callbacks=callbacks)
    state = _read_json(resume / "trainer_state.json") or {} if resume else {}
    resumed_from = {"checkpoint": resume.name, "global_step": state.get("global_step")} if resume else None
    if resume:
        _say(progress, f"Resuming from {resume.name} (step {state.get('global_step')} of {state.get('max_steps')})")
    _say(progress, f"Fine-tuning on {len(questions)} examples ({'LoRA' if config.lora else 'full'}, {dtype}, {device}), "
                   f"{config.epochs:g} epochs at lr {config.learning_rate:g}, checkpoints in {ckpt_dir}")  # fmt: skip
    t_train = time.time()
    try:
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except KeyboardInterrupt:
        last = last_complete_checkpoint(ckpt_dir)
        where = f"the last complete checkpoint is {last.name}" if last else "no checkpoint was completed yet"
        raise DistillDetectError(f"interrupted; {where}. Run the same command again to resume") from None
    except torch.OutOfMemoryError:  # pragma: no cover - needs a GPU
        raise DistillDetectError("out of memory while training; lower --batch-size (and raise --grad-accum to keep the global "
                                 "batch), lower --max-seq-len, or use --lora / --gradient-checkpointing") from None  # fmt: skip
    train_time, tokens = time.time() - t_train, trainer.state.num_input_tokens_seen - state.get("num_input_tokens_seen", 0)

    # Merge LoRA before measuring and saving, so the loss describes the checkpoint that is written.
    tmp, final = Path(tempfile.mkdtemp(prefix=_TMP, dir=out)), trainer.model
    if config.lora:
        final.save_pretrained(tmp / ADAPTER_DIR, safe_serialization=True)
        final = final.merge_and_unload()
    final_loss, final.config.use_cache = mean_loss(trainer, final), True
    final.to("cpu", dtype=getattr(torch, config.save_dtype)).save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)

    s, data = trainer.state, trainer.train_dataset
    losses = [{"step": h["step"], "epoch": round(h.get("epoch", 0.0), 4), "loss": h["loss"], "learning_rate": h.get("learning_rate")}
              for h in s.log_history if "loss" in h]  # fmt: skip
    last_epoch = [x["loss"] for x in losses[-max(1, round(s.max_steps / max(s.num_train_epochs, 1e-9))) :]]
    meta = {
        "format": 1, "package": {"name": "distill-detect", "version": __version__}, "run_key": run_key, "run": run,
        "base_model": {"spec": ref.spec, "location": ref.location, "identity": dict(ref.identity)},
        "config": asdict(config),
        "resolved": {"compute_dtype": dtype, "device": device, "max_seq_len": max_len, "global_batch_size": config.global_batch_size,
                     "total_steps": s.max_steps, "num_train_epochs": s.num_train_epochs},
        "data": {"hash": run["data_hash"], "n_examples": len(data), "responses_truncated": trainer.responses_cut,
                 "tokens_per_epoch": sum(map(len, data["input_ids"])),
                 "response_tokens_per_epoch": sum(sum(x != -100 for x in labels) for labels in data["labels"])},
        "train": {
            "final_train_loss": final_loss,
            "final_train_loss_note": "token-weighted mean cross-entropy of the saved model over its training responses (eval mode)",
            "last_epoch_mean_loss": sum(last_epoch) / len(last_epoch) if last_epoch else None,
            "mean_train_loss": result.training_loss, "losses": losses, "global_step": s.global_step, "epochs_completed": s.epoch,
            "resumed_from": resumed_from, "tokens_seen": tokens, "tokens_per_second": tokens / train_time if train_time > 0 else None,
            "train_time_s": train_time,
        },
        "lora": {"adapter_dir": ADAPTER_DIR} if config.lora else None,
        "wall_time_s": time.time() - t_start,
        "versions": {n: _version(n) for n in ("torch", "transformers", "accelerate", "peft", "trl", "datasets")},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }  # fmt: skip
    for p in sorted(tmp.iterdir()):  # publish each file by an atomic rename, then the marker
        if (out / p.name).exists():
            _remove(out / p.name)
        os.replace(p, out / p.name)
    tmp.rmdir()
    _write_json_atomic(out / MARKER, meta)
    if not config.keep_checkpoints:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    rate = meta["train"]["tokens_per_second"] or 0
    _say(progress, f"Wrote {out}: final train loss {final_loss:.4f} after {s.global_step} steps, {rate:.0f} tokens/s, {meta['wall_time_s']:.0f} s")  # fmt: skip
    return out


def _version(name: str) -> str | None:
    import importlib.metadata as md

    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


# -- command line: the training flags are generated from FinetuneConfig's fields ----------------------

_EPILOG = """\
examples:
  # distil the embedded SmolLM2-135M-Instruct on 32 GSM8K questions with GPT-3 solutions
  distill-detect finetune --data bundled:gsm8k_gpt3 --limit 32 --out student \\
      --epochs 5 --lr 1e-4 --max-seq-len 256

  # LoRA on your own teacher traces (fields 'prompt' and 'trace'), then audit the student
  distill-detect finetune --model ./base --data traces.jsonl --field prompt \\
      --response-field trace --out student-lora --lora --lora-r 16 --lr 2e-4

Running the same command again after an interruption resumes from the last checkpoint in
OUT/checkpoints/; a finished OUT is left as it is (pass --overwrite to train again). OUT is a
normal Hugging Face checkpoint: give it to --model of any other command.
"""


def add_config_args(parser, cls=FinetuneConfig, groups: dict | None = None) -> None:
    """One flag per field of ``cls``: ``--name-with-dashes`` unless the field names its own; None = the field's default."""
    groups = dict(groups or {})
    for f in fields(cls):
        m, d = f.metadata, f.default
        group = groups.get(m["group"]) or groups.setdefault(m["group"], parser.add_argument_group(m["group"]))
        shown = "" if d is None or isinstance(d, bool) else f" (default: {d:g})" if _num(d) else f" (default: {d})"
        kw = {"dest": f.name, "default": None, "help": (m["doc"] + shown).replace("%", "%%")}
        flag = m["flag"] or "--" + f.name.replace("_", "-")
        if f.type == "bool":
            kw["action"] = "store_true"
        else:
            kw.update(type={"float": float, "int": int, "str": str}[str(f.type).split(" |")[0]], choices=m["choices"])
            kw["metavar"] = None if m["choices"] else flag[2:].upper().replace("-", "_")
        group.add_argument(flag, **kw)


def config_from_args(args, cls=FinetuneConfig):
    """A config from parsed CLI arguments; options left out keep the config's defaults."""
    kw = {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None}
    if isinstance(kw.get("epochs"), float) and kw["epochs"].is_integer():
        kw["epochs"] = int(kw["epochs"])  # whole epochs given as 5.0 on the command line are recorded as 5
    return cls(**kw)


def add_cli(subparsers):
    """Add the ``finetune`` subcommand to an argparse subparsers object; returns its parser."""
    import argparse

    p = subparsers.add_parser(
        "finetune",
        help="distil a student: fine-tune a model on (question, response) pairs, loss on the response only",
        description="Fine-tune a chat model on (question, response) pairs with the loss on the response tokens only, in the "
        "model's chat template (the paper's distillation recipe), with trl. Full fine-tuning or LoRA; resumable.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("input and output")
    g.add_argument(
        "--model", default="default", help="base model: 'default' (embedded SmolLM2-135M-Instruct), a directory or a hub id"
    )
    g.add_argument("--data", required=True, help="JSONL/CSV/JSON/Parquet file with questions and responses, or bundled:NAME")
    g.add_argument("--out", required=True, help="output directory for the fine-tuned checkpoint")
    g.add_argument("--field", default="question", help="field holding the question (default: %(default)s)")
    g.add_argument("--response-field", default="response", help="field holding the response to train on (default: %(default)s)")
    g.add_argument("--limit", type=int, help="train on the first N examples only")
    g.add_argument("--overwrite", action="store_true", help="replace a finished or interrupted fine-tune in --out, not resume it")
    add_config_args(p, groups={"training": p.add_argument_group("training (defaults: the paper's recipe)")})
    p.set_defaults(func=cmd_finetune)
    return p


def cmd_finetune(args) -> int:
    """The ``finetune`` subcommand: load the data, fine-tune, print where the checkpoint is."""
    from distill_detect.data import load_questions

    config = config_from_args(args)
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit {args.limit}: give a positive number of examples")
    questions = load_questions(args.data, field=args.field, response_field=args.response_field, require_response=True)
    questions = questions[: args.limit] if args.limit is not None else questions
    out = finetune(args.model, questions, args.out, config, progress=not getattr(args, "quiet", False), overwrite=args.overwrite)
    meta = _read_json(out / MARKER) or {}
    loss, n = meta.get("train", {}).get("final_train_loss"), meta.get("data", {}).get("n_examples", len(questions))
    print(
        f"{out}\t{n} examples\tfinal train loss {loss:.4f}\t{meta.get('wall_time_s', 0):.0f} s" if loss is not None else str(out)
    )
    return 0
