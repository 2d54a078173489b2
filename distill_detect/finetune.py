"""Distil a student: supervised fine-tuning on (question, response) pairs, loss on the response only.

This is how the paper builds its students (../shared/PAPER.md): the teacher's response is put
in the assistant turn of the student's own chat template, the question in the user turn, and
the cross-entropy is taken over the response tokens and the end-of-turn token only. Prompt
tokens and padding carry the label -100 and never contribute to the loss.

Contract of ``finetune`` (and of ``distill-detect finetune``):

* The output directory is an ordinary Hugging Face checkpoint (``config.json``,
  ``model.safetensors``, tokenizer files with the chat template) that ``--model`` accepts
  everywhere. With LoRA the adapter is merged into the weights of that checkpoint and also
  kept on its own under ``OUT/adapter/``.
* ``OUT/distill_detect_finetune.json`` records the resolved configuration, the base model's
  identity, a hash of the training data, the train losses (per step, and the final loss of the
  trained model over its training data), token throughput, wall time and package versions. It
  is written last: its presence means the run is complete.
* Resumable: Trainer checkpoints go to ``OUT/checkpoints/``. Running the same call again after
  an interruption (Ctrl-C, kill -9, a lost machine) resumes from the last complete checkpoint;
  a finished ``OUT`` is returned as is. A different configuration, base model or training set
  than the interrupted (or finished) run is refused unless ``overwrite=True``.
* Only safetensors and JSON are kept once a run completes. While it runs, the Trainer stores
  optimizer, scheduler and RNG state with ``torch.save`` (pickle format); transformers reads
  them back with ``torch.load(weights_only=True)``, which refuses arbitrary objects. The
  pickled ``training_args.bin`` that the Trainer also writes is deleted as soon as it appears
  (nothing reads it). ``OUT/checkpoints/`` is removed when the run completes, unless
  ``keep_checkpoints`` is set.

torch, transformers and peft are imported inside the functions that need them, so importing
this module (and ``distill-detect --help``) stays instant.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from distill_detect.backends.base import END_OF_TURN
from distill_detect.errors import ConfigError, DistillDetectError, InputError
from distill_detect.types import Question

log = logging.getLogger(__name__)

MARKER = "distill_detect_finetune.json"
"""Written last into the output directory; its presence means the fine-tune completed."""
CHECKPOINTS = "checkpoints"
"""Sub-directory of the output directory that holds the Trainer's intermediate checkpoints."""
RUN_FILE = "distill_detect_run.json"
"""Inside ``checkpoints/``: what the interrupted run was (config, data hash, base model)."""
ADAPTER_DIR = "adapter"
"""Sub-directory of the output directory that keeps the LoRA adapter on its own."""
_LOCK = ".distill_detect_finetune.lock"
_TMP_PREFIX = ".final-"

_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt")
_DTYPES = ("auto", "float32", "bfloat16", "float16")
# Settings that do not change the trained weights: they may differ between an interrupted run and its resume.
_NOT_IN_KEY = ("save_steps", "save_total_limit", "keep_checkpoints")


@dataclass(frozen=True)
class FinetuneConfig:
    """How a student is distilled. Defaults follow the paper's recipe unless noted.

    The paper fine-tunes 7B-32B models fully, in bf16, for 5 epochs at learning rate 1e-5.
    A 135M model trained on a few dozen examples barely moves at 1e-5: to make a small
    student memorise its distillation data on a CPU, raise ``learning_rate`` to about 1e-4
    (see the measurements in the README). LoRA usually needs 1e-4 to 2e-4 as well.
    """

    epochs: float = 5
    """Passes over the training data (paper: 5). Fractions are allowed."""
    learning_rate: float = 1e-5
    """Peak learning rate of AdamW (paper: 1e-5; small models on few examples need ~1e-4 to memorise)."""
    lr_scheduler: str = "cosine"
    """Learning-rate schedule after warm-up, a transformers scheduler name (paper: cosine)."""
    warmup_ratio: float = 0.05
    """Fraction of the optimizer steps spent warming the learning rate up linearly from 0 (paper: 5%)."""
    weight_decay: float = 1e-4
    """AdamW decoupled weight decay (paper: 1e-4)."""
    adam_beta1: float = 0.9
    """AdamW beta1 (paper: 0.9)."""
    adam_beta2: float = 0.95
    """AdamW beta2 (paper: 0.95)."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm (transformers' default; the paper does not say). 0 disables it."""
    per_device_batch_size: int = 8
    """Examples per forward pass on each device. Lower it if memory runs out; raise ``gradient_accumulation_steps`` to keep the global batch."""
    gradient_accumulation_steps: int = 1
    """Forward passes accumulated per optimizer step. Global batch = per_device_batch_size x this x devices (paper: 8)."""
    max_seq_len: int = 1024
    """Tokens per example (prompt + response + end-of-turn). Longer responses are cut, with a warning; a prompt that leaves no room is an error."""
    max_steps: int | None = None
    """Stop after this many optimizer steps instead of after ``epochs`` (smoke tests, time-boxed runs). None: train ``epochs``."""
    seed: int = 42
    """Seeds data order, LoRA initialisation and dropout. Same seed, data and machine: same weights."""
    lora: bool = False
    """Train a LoRA adapter (peft) instead of every weight (the paper fine-tunes fully). The adapter is merged into the saved checkpoint."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: float = 32
    """LoRA scaling numerator (the update is scaled by lora_alpha / lora_r)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA branch's input."""
    lora_target_modules: str = "all-linear"
    """Modules that get adapters: 'all-linear' (every linear layer except the output head) or comma-separated names, e.g. 'q_proj,v_proj'."""
    save_steps: int | None = None
    """Checkpoint every this many optimizer steps (and at the end). None: at the end of every epoch. Does not change the result."""
    save_total_limit: int = 1
    """Checkpoints kept on disk while training (the newest; older ones are deleted after a newer one is complete)."""
    keep_checkpoints: bool = False
    """Keep ``OUT/checkpoints/`` after the run completes (they hold optimizer state, several times the model's size)."""
    dtype: str = "auto"
    """Compute precision: 'float32', 'bfloat16' or 'float16' mixed precision (master weights stay float32), or 'auto' = bfloat16 on a GPU that supports it, else float32 (paper: bf16). On CPUs bfloat16 autocast measured slower than float32."""
    save_dtype: str = "float32"
    """Precision of the saved checkpoint: 'float32' keeps small updates exactly; 'bfloat16' halves the size but can round away updates as small as lr 1e-5 makes."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about 30% slower. For long sequences or big models."""
    system_prompt: str | None = None
    """System turn of the training prompts; None keeps the chat template's default. Use the same value when auditing the student."""

    def __post_init__(self) -> None:
        def bad(name, fix):
            raise ConfigError(f"{name} = {getattr(self, name)!r} is not valid: {fix}")

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if not is_num(self.epochs) or self.epochs <= 0:
            bad("epochs", "give a positive number of passes over the data (the paper uses 5)")
        if not is_num(self.learning_rate) or not 0 < self.learning_rate < 1:
            bad("learning_rate", "give a value in (0, 1), e.g. 1e-5 (paper) or 1e-4 (small models)")
        if self.lr_scheduler not in _SCHEDULERS:
            bad("lr_scheduler", f"choose one of {', '.join(_SCHEDULERS)}")
        if not is_num(self.warmup_ratio) or not 0 <= self.warmup_ratio < 1:
            bad("warmup_ratio", "give a fraction in [0, 1), e.g. 0.05")
        if not is_num(self.weight_decay) or self.weight_decay < 0:
            bad("weight_decay", "give a value >= 0, e.g. 1e-4")
        for name in ("adam_beta1", "adam_beta2"):
            if not is_num(getattr(self, name)) or not 0 <= getattr(self, name) < 1:
                bad(name, "give a value in [0, 1), e.g. 0.9 / 0.95")
        if not is_num(self.max_grad_norm) or self.max_grad_norm < 0:
            bad("max_grad_norm", "give a value >= 0 (0 disables clipping)")
        for name in ("per_device_batch_size", "gradient_accumulation_steps", "lora_r", "save_total_limit"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                bad(name, "give a positive integer")
        if not is_int(self.max_seq_len) or self.max_seq_len < 16:
            bad("max_seq_len", "give an integer >= 16 that fits a prompt and its response, e.g. 1024")
        if self.max_steps is not None and (not is_int(self.max_steps) or self.max_steps < 1):
            bad("max_steps", "give a positive integer, or None to train for `epochs`")
        if not is_int(self.seed) or self.seed < 0:
            bad("seed", "give a non-negative integer")
        if not isinstance(self.lora, bool):
            bad("lora", "give True or False")
        if not is_num(self.lora_alpha) or self.lora_alpha <= 0:
            bad("lora_alpha", "give a positive number, e.g. 2 x lora_r")
        if not is_num(self.lora_dropout) or not 0 <= self.lora_dropout < 1:
            bad("lora_dropout", "give a probability in [0, 1)")
        if not isinstance(self.lora_target_modules, str) or not self.lora_target_modules.strip():
            bad("lora_target_modules", "give 'all-linear' or comma-separated module names such as 'q_proj,v_proj'")
        if self.save_steps is not None and (not is_int(self.save_steps) or self.save_steps < 1):
            bad("save_steps", "give a positive integer, or None to checkpoint once per epoch")
        if self.dtype not in _DTYPES:
            bad("dtype", f"choose one of {', '.join(_DTYPES)}")
        if self.save_dtype not in ("float32", "bfloat16", "float16"):
            bad("save_dtype", "choose float32, bfloat16 or float16")
        if self.system_prompt is not None and not isinstance(self.system_prompt, str):
            bad("system_prompt", "give a string, or None for the template's default")

    @property
    def global_batch_size(self) -> int:
        """Examples per optimizer step on one device."""
        return self.per_device_batch_size * self.gradient_accumulation_steps

    def training_key(self) -> dict:
        """The settings that change the trained weights (compared when resuming)."""
        return {k: v for k, v in asdict(self).items() if k not in _NOT_IN_KEY}


# -- data ------------------------------------------------------------------------------------------


def data_hash(questions: list[Question]) -> str:
    """sha256 over the ordered (id, question, response) triples (order changes the data order, hence the weights)."""
    h = hashlib.sha256()
    for q in questions:
        h.update(json.dumps([q.id, q.text, q.response], ensure_ascii=False).encode("utf-8") + b"\n")
    return h.hexdigest()[:24]


def _response_part(tokenizer, prompt: str, full: str) -> str:
    """The trained text: response + end-of-turn, without whitespace the template puts after the end-of-turn."""
    part = full[len(prompt) :]
    stripped = part.rstrip()
    ends = tuple(t for t in (tokenizer.eos_token, *END_OF_TURN) if t)
    return stripped if stripped != part and stripped.endswith(ends) else part


def encode_example(tokenizer, question: str, response: str, *, max_seq_len: int, system_prompt: str | None = None) -> dict:
    """Token ids and labels of one training example.

    ``input_ids`` = the prompt exactly as ``prompts.build_prompt`` tokenises it for generation,
    followed by the tokens of response + end-of-turn. ``labels`` = -100 over the prompt, the
    token ids over the response part. Returns also ``truncated`` (the response was cut at
    ``max_seq_len``). Raises InputError when the prompt alone fills ``max_seq_len``.
    """
    from distill_detect.prompts import render_with_response

    prompt, full = render_with_response(tokenizer, question, response, system_prompt)
    prompt_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    target_ids = list(tokenizer(_response_part(tokenizer, prompt, full), add_special_tokens=False)["input_ids"])
    room = max_seq_len - len(prompt_ids)
    if room < 1:
        raise InputError(
            "training data",
            f"the prompt is {len(prompt_ids)} tokens, which leaves no room for the response within max_seq_len={max_seq_len}; "
            "raise --max-seq-len or drop this question",
            field="question",
        )
    truncated = len(target_ids) > room
    target_ids = target_ids[:room]
    return {
        "input_ids": prompt_ids + target_ids,
        "labels": [-100] * len(prompt_ids) + target_ids,
        "truncated": truncated,
    }


class ResponseOnlyCollator:
    """Right-pads a list of ``encode_example`` dicts into tensors; padding gets label -100 and mask 0.

    Counts the real (non-padding) tokens it has collated in ``tokens_seen``.
    """

    def __init__(self, pad_id: int):
        self.pad_id = int(pad_id)
        self.tokens_seen = 0

    def __call__(self, features: list[dict]) -> dict:
        import torch

        n = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(features), n), -100, dtype=torch.long)
        mask = torch.zeros((len(features), n), dtype=torch.long)
        for i, f in enumerate(features):
            k = len(f["input_ids"])
            ids[i, :k] = torch.tensor(f["input_ids"], dtype=torch.long)
            labels[i, :k] = torch.tensor(f["labels"], dtype=torch.long)
            mask[i, :k] = 1
            self.tokens_seen += k
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# -- output directory bookkeeping ------------------------------------------------------------------


def _say(progress: bool, msg: str) -> None:
    log.info(msg)
    if progress:
        print(msg, file=sys.stderr, flush=True)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, ensure_ascii=False)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _is_ours(out: Path) -> bool:
    """True when ``out`` is absent, empty, or holds (part of) a distill-detect fine-tune."""
    if not out.exists():
        return True
    if (out / MARKER).exists() or (out / CHECKPOINTS / RUN_FILE).exists():
        return True
    return all(p.name in (CHECKPOINTS, _LOCK) or p.name.startswith(_TMP_PREFIX) for p in out.iterdir())


def _clear(out: Path) -> None:
    """Remove a previous fine-tune's files from ``out`` (the lock file stays: we hold it)."""
    for p in out.iterdir():
        if p.name == _LOCK:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


@contextmanager
def _locked(out: Path):
    """An exclusive lock on ``out`` for the duration of a fine-tune (released by the OS if the process dies)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    fh = open(out / _LOCK, "a")
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"another fine-tune is writing to {out}; wait for it to finish or choose another --out") from None
        yield
    finally:
        fh.close()


def _differences(old: dict, new: dict) -> list[str]:
    diffs = []
    old_cfg, new_cfg = old.get("config", {}), new.get("config", {})
    for k in sorted(set(old_cfg) | set(new_cfg)):
        if old_cfg.get(k) != new_cfg.get(k):
            diffs.append(f"{k}: {old_cfg.get(k)!r} -> {new_cfg.get(k)!r}")
    if old.get("data_hash") != new.get("data_hash"):
        diffs.append(
            f"training data: {old.get('n_examples')} examples (hash {old.get('data_hash')}) -> {new.get('n_examples')} (hash {new.get('data_hash')})"
        )
    if old.get("base_model") != new.get("base_model"):
        diffs.append(f"base model: {old.get('base_model')} -> {new.get('base_model')}")
    return diffs


def _checkpoint_step(p: Path) -> int:
    try:
        return int(p.name.split("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def last_complete_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest ``checkpoint-N`` in ``ckpt_dir`` whose save finished, else None.

    The Trainer writes ``trainer_state.json`` after the weights, optimizer, scheduler and RNG
    state, so a checkpoint without it was interrupted mid-save.
    """
    if not ckpt_dir.is_dir():
        return None
    found = [p for p in ckpt_dir.glob("checkpoint-*") if p.is_dir() and _checkpoint_step(p) >= 0]
    complete = [p for p in found if (p / "trainer_state.json").exists()]
    return max(complete, key=_checkpoint_step) if complete else None


def _drop_incomplete_checkpoints(ckpt_dir: Path) -> None:
    for p in ckpt_dir.glob("checkpoint-*"):
        if p.is_dir() and not (p / "trainer_state.json").exists():
            shutil.rmtree(p, ignore_errors=True)


# -- the fine-tune -----------------------------------------------------------------------------------


def _resolve_precision(config: FinetuneConfig, torch) -> tuple[str, str]:
    """(compute dtype, device) for this machine."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = config.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if device == "cpu" and dtype == "float16":
        raise ConfigError("dtype = 'float16' needs a GPU; use float32 or bfloat16 on a CPU")
    return dtype, device


def _callbacks(transformers, show_bar: bool):
    """Our Trainer callbacks: delete pickled training args; a progress bar that shows the loss instead of printing lines."""

    class _NoPickleArgs(transformers.TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            (Path(args.output_dir) / f"checkpoint-{state.global_step}" / "training_args.bin").unlink(missing_ok=True)

    class _Bar(transformers.trainer_callback.ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.training_bar is not None and logs and "loss" in logs:
                self.training_bar.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)

    return _NoPickleArgs(), (_Bar() if show_bar else None)


def _mean_loss(model, examples: list[dict], collator, batch_size: int, device) -> float:
    """Token-weighted mean cross-entropy of ``model`` over the response tokens of ``examples`` (eval mode)."""
    import torch

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    counted = collator.tokens_seen
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collator(examples[i : i + batch_size]).items()}
            n = int((batch["labels"][:, 1:] != -100).sum())
            if n:
                total += float(model(**batch).loss) * n
                count += n
    collator.tokens_seen = counted
    model.train(was_training)
    return total / count if count else float("nan")


def finetune(
    base_model: str | None,
    questions: list[Question],
    out_dir,
    config: FinetuneConfig | None = None,
    *,
    progress: bool = True,
    overwrite: bool = False,
    callbacks: list | None = None,
) -> Path:
    """Fine-tune ``base_model`` on the (question, response) pairs and write a checkpoint to ``out_dir``.

    ``base_model``: None or 'default' (the embedded SmolLM2-135M-Instruct), a local checkpoint
    directory, or a hub id. ``questions``: each needs a non-empty ``response`` (the teacher
    trace). ``progress``: a progress bar and status lines on stderr when stderr is a terminal
    (status lines only otherwise); False: silent. ``overwrite``: replace a previous or
    interrupted fine-tune in ``out_dir`` instead of returning or resuming it. ``callbacks``:
    extra ``transformers.TrainerCallback`` objects (tests, notebooks).

    Returns ``out_dir``. Running the same call again resumes an interrupted run from its last
    complete checkpoint, and returns a completed one at once. See the module docstring for the
    layout of ``out_dir``.
    """
    from distill_detect.models import resolve_model

    config = config or FinetuneConfig()
    if not isinstance(config, FinetuneConfig):
        raise ConfigError(f"config must be a FinetuneConfig, got {type(config).__name__}")
    questions = list(questions)
    if not questions:
        raise ConfigError("no training examples: give at least one question with a response")
    for q in questions:
        if not (isinstance(q.response, str) and q.response.strip()):
            raise InputError("training data", f"question {q.id!r} has no response to train on", field="response")
    out = Path(out_dir).expanduser()
    t_start = time.time()

    ref = resolve_model(base_model)
    dhash = data_hash(questions)
    run = {
        "config": config.training_key(),
        "data_hash": dhash,
        "n_examples": len(questions),
        "base_model": dict(ref.identity),
    }
    run_key = hashlib.sha256(json.dumps(run, sort_keys=True).encode()).hexdigest()[:24]

    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a file; give a directory for the fine-tuned checkpoint")
    base_loc = Path(ref.location)
    if base_loc.exists() and out.resolve() == base_loc.resolve():
        raise ConfigError(f"--out {str(out)!r} is the base model's own directory; choose a new directory")
    if not _is_ours(out):
        raise ConfigError(
            f"--out {str(out)!r} exists and does not hold a distill-detect fine-tune; choose a new or empty directory"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the output directory {str(out)!r} ({exc.strerror}); choose a writable --out") from None
    if not os.access(out, os.W_OK):
        raise ConfigError(f"the output directory {str(out)!r} is not writable; choose a writable --out")

    with _locked(out):
        done = _read_json(out / MARKER)
        if done is not None and not overwrite:
            if done.get("run_key") == run_key:
                if not done.get("config", {}).get("keep_checkpoints", True):  # killed while removing them
                    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
                _say(progress, f"{out} already holds this fine-tune (completed); nothing to do")
                return out
            diffs = _differences(done.get("run", {}), run)
            raise ConfigError(
                f"{out} holds a completed fine-tune with different settings ({'; '.join(diffs) or 'unknown'}); "
                "choose another --out, or pass --overwrite to replace it"
            )
        ckpt_dir = out / CHECKPOINTS
        old_run = _read_json(ckpt_dir / RUN_FILE)
        if overwrite and (done is not None or old_run is not None or any(p.name != _LOCK for p in out.iterdir())):
            _say(progress, f"--overwrite: removing the previous fine-tune in {out}")
            _clear(out)
            old_run = None
        if old_run is not None and old_run.get("run_key") != run_key:
            diffs = _differences(old_run, run)
            raise ConfigError(
                f"{out} holds an interrupted fine-tune with different settings ({'; '.join(diffs) or 'unknown'}); "
                "re-run with the original settings to resume it, choose another --out, or pass --overwrite to start over"
            )
        ckpt_dir.mkdir(exist_ok=True)
        for stale in out.glob(_TMP_PREFIX + "*"):
            shutil.rmtree(stale, ignore_errors=True)
        if old_run is None:
            _write_json_atomic(ckpt_dir / RUN_FILE, {**run, "run_key": run_key})
        _drop_incomplete_checkpoints(ckpt_dir)
        resume = last_complete_checkpoint(ckpt_dir)
        with _transformers_bars(progress and sys.stderr.isatty()):
            return _train(
                ref, questions, out, config, run, run_key, resume, progress=progress, callbacks=callbacks, t_start=t_start
            )


@contextmanager
def _transformers_bars(show: bool):
    """Silence transformers' own load/save progress bars unless we show progress on a terminal."""
    from distill_detect.errors import require

    hf_logging = require("transformers.utils.logging", "finetune", "Fine-tuning")
    was = hf_logging.is_progress_bar_enabled()
    if was and not show:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and not show:
            hf_logging.enable_progress_bar()


def _train(ref, questions, out, config, run, run_key, resume, *, progress, callbacks, t_start) -> Path:
    """Load, train (resuming from ``resume`` when given), save atomically, write the marker."""
    from distill_detect import __version__
    from distill_detect.errors import require
    from distill_detect.models import load_hf

    torch = require("torch", "finetune", "Fine-tuning")
    transformers = require("transformers", "finetune", "Fine-tuning")
    ckpt_dir = out / CHECKPOINTS
    show_bar = progress and sys.stderr.isatty()
    dtype, device = _resolve_precision(config, torch)

    _say(progress, f"Loading {ref.spec} ...")
    model, tok, _, _ = load_hf(ref, dtype="float32", device="cpu")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if pad_id is None:
        raise DistillDetectError("the tokenizer has neither a pad nor an EOS token; cannot pad training batches")
    max_len = config.max_seq_len
    context = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    if context and max_len > context:
        warnings.warn(f"max_seq_len={max_len} exceeds the model's context ({context}); using {context}", stacklevel=3)
        max_len = context

    examples, n_cut = [], 0
    for q in questions:
        try:
            ex = encode_example(tok, q.text, q.response, max_seq_len=max_len, system_prompt=config.system_prompt)
        except InputError as exc:
            raise InputError(f"question {q.id!r}", exc.problem, field="question") from None
        n_cut += ex.pop("truncated")
        examples.append(ex)
    if n_cut:
        warnings.warn(
            f"{n_cut} of {len(examples)} responses were cut at max_seq_len={max_len} tokens (their end is not trained); "
            "raise --max-seq-len to train them whole",
            stacklevel=3,
        )
    tokens_per_epoch = sum(len(e["input_ids"]) for e in examples)
    response_tokens_per_epoch = sum(sum(1 for x in e["labels"] if x != -100) for e in examples)

    transformers.set_seed(config.seed)
    model.config.use_cache = False
    if config.lora:
        peft = require("peft", "finetune", "LoRA fine-tuning")
        targets = config.lora_target_modules.strip()
        lora_cfg = peft.LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()],
            task_type="CAUSAL_LM",
        )
        try:
            model = peft.get_peft_model(model, lora_cfg)
        except ValueError as exc:
            raise ConfigError(f"lora_target_modules = {targets!r}: {str(exc).splitlines()[0]}") from None
        if config.gradient_checkpointing:
            model.enable_input_require_grads()

    # transformers 5 renamed two arguments; pass whichever this version has.
    arg_names = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    version_kw = {
        ("activation_checkpointing" if "activation_checkpointing" in arg_names else "gradient_checkpointing"): (
            config.gradient_checkpointing
        ),
        # transformers 5 reads a warmup_steps below 1 as a ratio of the total steps.
        **({"warmup_ratio": config.warmup_ratio} if "warmup_ratio" in arg_names else {"warmup_steps": config.warmup_ratio}),
    }
    args = transformers.TrainingArguments(
        **version_kw,
        output_dir=str(ckpt_dir),
        num_train_epochs=float(config.epochs),
        max_steps=config.max_steps or -1,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        weight_decay=config.weight_decay,
        adam_beta1=config.adam_beta1,
        adam_beta2=config.adam_beta2,
        max_grad_norm=config.max_grad_norm,
        optim="adamw_torch",
        per_device_train_batch_size=config.per_device_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        seed=config.seed,
        data_seed=config.seed,
        bf16=dtype == "bfloat16",
        fp16=dtype == "float16",
        use_cpu=device == "cpu",
        logging_strategy="steps",
        logging_steps=1,
        save_strategy="epoch" if config.save_steps is None else "steps",
        save_steps=config.save_steps or 500,
        save_total_limit=config.save_total_limit,
        report_to="none",
        disable_tqdm=not show_bar,
        remove_unused_columns=False,
        label_names=["labels"],
        dataloader_num_workers=0,
    )
    collator = ResponseOnlyCollator(pad_id)
    no_pickle, bar = _callbacks(transformers, show_bar)
    trainer = transformers.Trainer(
        model=model,
        args=args,
        data_collator=collator,
        train_dataset=examples,
        processing_class=tok,
        callbacks=[no_pickle, *(callbacks or [])],
    )
    # Quiet by default: no printed dict per logging step; on a terminal, a bar with the loss on it.
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
    trainer.remove_callback(transformers.trainer_callback.ProgressCallback)
    if bar is not None:
        trainer.add_callback(bar)

    resumed_from = None
    if resume is not None:
        state = _read_json(resume / "trainer_state.json") or {}
        resumed_from = {"checkpoint": resume.name, "global_step": state.get("global_step")}
        _say(progress, f"Resuming from {resume.name} (step {state.get('global_step')} of {state.get('max_steps')})")
    _say(
        progress,
        f"Fine-tuning on {len(examples)} examples ({'LoRA' if config.lora else 'full'}, {dtype}, {device}), "
        f"{config.epochs:g} epochs at lr {config.learning_rate:g}, checkpoints in {ckpt_dir}",
    )
    t_train = time.time()
    try:
        result = trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    except KeyboardInterrupt:
        last = last_complete_checkpoint(ckpt_dir)
        where = f"the last complete checkpoint is {last.name}" if last else "no checkpoint was completed yet"
        raise DistillDetectError(f"interrupted; {where}. Run the same command again to resume") from None
    except torch.OutOfMemoryError:  # pragma: no cover - needs a GPU
        raise DistillDetectError(
            "out of memory while training; lower --batch-size (and raise --grad-accum to keep the global batch), "
            "lower --max-seq-len, or use --lora / --gradient-checkpointing"
        ) from None
    train_time = time.time() - t_train
    state = trainer.state

    # Merge LoRA before measuring and saving, so the loss describes the checkpoint that is written.
    tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=out))
    final = trainer.model
    if config.lora:
        final.save_pretrained(tmp / ADAPTER_DIR, safe_serialization=True)
        final = final.merge_and_unload()
    final_loss = _mean_loss(final, examples, collator, config.per_device_batch_size, args.device)
    final.config.use_cache = True
    final = final.to("cpu", dtype=getattr(torch, config.save_dtype))
    final.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / "training_args.bin").unlink(missing_ok=True)

    losses = [
        {"step": h["step"], "epoch": round(h.get("epoch", 0.0), 4), "loss": h["loss"], "learning_rate": h.get("learning_rate")}
        for h in state.log_history
        if "loss" in h
    ]
    steps_per_epoch = max(1, round(state.max_steps / max(state.num_train_epochs, 1e-9)))
    last_epoch = [x["loss"] for x in losses[-steps_per_epoch:]]
    meta = {
        "format": 1,
        "package": {"name": "distill-detect", "version": __version__},
        "run_key": run_key,
        "run": run,
        "base_model": {"spec": ref.spec, "location": ref.location, "identity": dict(ref.identity)},
        "config": asdict(config),
        "resolved": {
            "compute_dtype": dtype,
            "device": device,
            "max_seq_len": max_len,
            "global_batch_size": config.global_batch_size,
            "total_steps": state.max_steps,
            "num_train_epochs": state.num_train_epochs,
        },
        "data": {
            "hash": run["data_hash"],
            "n_examples": len(examples),
            "responses_truncated": n_cut,
            "tokens_per_epoch": tokens_per_epoch,
            "response_tokens_per_epoch": response_tokens_per_epoch,
        },
        "train": {
            "final_train_loss": final_loss,
            "final_train_loss_note": "token-weighted mean cross-entropy of the saved model over its training responses (eval mode)",
            "last_epoch_mean_loss": sum(last_epoch) / len(last_epoch) if last_epoch else None,
            "mean_train_loss": result.training_loss,
            "losses": losses,
            "global_step": state.global_step,
            "epochs_completed": state.epoch,
            "resumed_from": resumed_from,
            "tokens_seen": collator.tokens_seen,
            "tokens_per_second": collator.tokens_seen / train_time if train_time > 0 else None,
            "train_time_s": train_time,
        },
        "lora": {"adapter_dir": ADAPTER_DIR} if config.lora else None,
        "wall_time_s": time.time() - t_start,
        "versions": _versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _publish(tmp, out)
    _write_json_atomic(out / MARKER, meta)
    if not config.keep_checkpoints:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    _say(
        progress,
        f"Wrote {out}: final train loss {final_loss:.4f} after {state.global_step} steps, "
        f"{meta['train']['tokens_per_second'] or 0:.0f} tokens/s, {meta['wall_time_s']:.0f} s",
    )
    return out


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished checkpoint's files from ``tmp`` into ``out``, each by an atomic rename."""
    for p in sorted(tmp.iterdir()):
        dest = out / p.name
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        os.replace(p, dest)
    tmp.rmdir()


def _versions() -> dict:
    import importlib.metadata as md

    v = {}
    for name in ("torch", "transformers", "accelerate", "peft"):
        try:
            v[name] = md.version(name)
        except md.PackageNotFoundError:
            v[name] = None
    return v


# -- command line ------------------------------------------------------------------------------------

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


def add_cli(subparsers):
    """Add the ``finetune`` subcommand to an argparse subparsers object; returns its parser."""
    import argparse

    d = FinetuneConfig()
    p = subparsers.add_parser(
        "finetune",
        help="distil a student: fine-tune a model on (question, response) pairs, loss on the response only",
        description="Fine-tune a chat model on (question, response) pairs with the loss on the response tokens only, "
        "in the model's chat template (the paper's distillation recipe). Full fine-tuning or LoRA; resumable.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("input and output")
    g.add_argument(
        "--model",
        default="default",
        help="base model: 'default' (embedded SmolLM2-135M-Instruct), a checkpoint directory or a hub id",
    )
    g.add_argument("--data", required=True, help="JSONL/CSV/JSON/Parquet file with questions and responses, or bundled:NAME")
    g.add_argument("--out", required=True, help="output directory for the fine-tuned checkpoint")
    g.add_argument("--field", default="question", help="field holding the question (default: %(default)s)")
    g.add_argument("--response-field", default="response", help="field holding the response to train on (default: %(default)s)")
    g.add_argument("--limit", type=int, help="train on the first N examples only")
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a finished or interrupted fine-tune in --out instead of returning/resuming it",
    )
    g = p.add_argument_group("training (defaults: the paper's recipe)")
    g.add_argument("--epochs", type=float, help=f"passes over the data (default {d.epochs:g})")
    g.add_argument(
        "--lr", type=float, help=f"peak learning rate (default {d.learning_rate:g}; ~1e-4 for small models on few examples)"
    )
    g.add_argument("--lr-scheduler", choices=_SCHEDULERS, help=f"schedule after warm-up (default {d.lr_scheduler})")
    g.add_argument("--warmup-ratio", type=float, help=f"fraction of steps for linear warm-up (default {d.warmup_ratio:g})")
    g.add_argument("--weight-decay", type=float, help=f"AdamW weight decay (default {d.weight_decay:g})")
    g.add_argument("--adam-beta1", type=float, help=f"(default {d.adam_beta1:g})")
    g.add_argument("--adam-beta2", type=float, help=f"(default {d.adam_beta2:g})")
    g.add_argument("--max-grad-norm", type=float, help=f"gradient clipping, 0 = off (default {d.max_grad_norm:g})")
    g.add_argument("--batch-size", type=int, help=f"examples per forward pass (default {d.per_device_batch_size})")
    g.add_argument("--grad-accum", type=int, help=f"forward passes per optimizer step (default {d.gradient_accumulation_steps})")
    g.add_argument("--max-seq-len", type=int, help=f"tokens per example; longer responses are cut (default {d.max_seq_len})")
    g.add_argument("--max-steps", type=int, help="stop after N optimizer steps instead of after --epochs")
    g.add_argument("--seed", type=int, help=f"(default {d.seed})")
    g.add_argument("--dtype", choices=_DTYPES, help="compute precision; auto = bf16 on a GPU, float32 on a CPU")
    g.add_argument(
        "--save-dtype",
        choices=("float32", "bfloat16", "float16"),
        help=f"precision of the saved weights (default {d.save_dtype})",
    )
    g.add_argument("--gradient-checkpointing", action="store_true", default=None, help="less memory, slower")
    g.add_argument("--system-prompt", help="system turn of the training prompts (default: the template's own)")
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora", action="store_true", default=None, help="train a LoRA adapter and merge it into the saved weights")
    g.add_argument("--lora-r", type=int, help=f"rank (default {d.lora_r})")
    g.add_argument("--lora-alpha", type=float, help=f"(default {d.lora_alpha:g})")
    g.add_argument("--lora-dropout", type=float, help=f"(default {d.lora_dropout:g})")
    g.add_argument("--lora-target-modules", help=f"'all-linear' or comma-separated names (default {d.lora_target_modules})")
    g = p.add_argument_group("checkpoints")
    g.add_argument("--save-steps", type=int, help="checkpoint every N optimizer steps (default: every epoch)")
    g.add_argument("--keep-checkpoints", action="store_true", default=None, help="keep OUT/checkpoints/ after the run completes")
    p.set_defaults(func=cmd_finetune)
    return p


_CLI_TO_CONFIG = {
    "epochs": "epochs",
    "lr": "learning_rate",
    "lr_scheduler": "lr_scheduler",
    "warmup_ratio": "warmup_ratio",
    "weight_decay": "weight_decay",
    "adam_beta1": "adam_beta1",
    "adam_beta2": "adam_beta2",
    "max_grad_norm": "max_grad_norm",
    "batch_size": "per_device_batch_size",
    "grad_accum": "gradient_accumulation_steps",
    "max_seq_len": "max_seq_len",
    "max_steps": "max_steps",
    "seed": "seed",
    "dtype": "dtype",
    "save_dtype": "save_dtype",
    "gradient_checkpointing": "gradient_checkpointing",
    "system_prompt": "system_prompt",
    "lora": "lora",
    "lora_r": "lora_r",
    "lora_alpha": "lora_alpha",
    "lora_dropout": "lora_dropout",
    "lora_target_modules": "lora_target_modules",
    "save_steps": "save_steps",
    "keep_checkpoints": "keep_checkpoints",
}


def config_from_args(args) -> FinetuneConfig:
    """A FinetuneConfig from parsed CLI arguments; options left out keep the config's defaults."""
    kw = {}
    for opt, name in _CLI_TO_CONFIG.items():
        value = getattr(args, opt, None)
        if value is not None:
            kw[name] = value
    # Whole epochs given as 5.0 on the command line are recorded as 5.
    if isinstance(kw.get("epochs"), float) and kw["epochs"].is_integer():
        kw["epochs"] = int(kw["epochs"])
    return FinetuneConfig(**kw)


def cmd_finetune(args) -> int:
    """The ``finetune`` subcommand: load the data, fine-tune, print where the checkpoint is."""
    from distill_detect.data import load_questions

    config = config_from_args(args)
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit {args.limit}: give a positive number of examples")
    questions = load_questions(args.data, field=args.field, response_field=args.response_field, require_response=True)
    if args.limit is not None:
        questions = questions[: args.limit]
    out = finetune(args.model, questions, args.out, config, progress=not getattr(args, "quiet", False), overwrite=args.overwrite)
    meta = _read_json(out / MARKER) or {}
    train = meta.get("train", {})
    loss = train.get("final_train_loss")
    print(
        f"{out}\t{meta.get('data', {}).get('n_examples', len(questions))} examples\t"
        f"final train loss {loss:.4f}" + (f"\t{meta.get('wall_time_s', 0):.0f} s" if meta else "")
        if loss is not None
        else str(out)
    )
    return 0
