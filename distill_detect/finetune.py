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
OUT follows ``checkpoint_dir``'s rules: one writer (a lock), Trainer checkpoints in OUT/checkpoints/, the same
call again after an interruption (Ctrl-C, kill -9) resumes from the last complete one, a finished OUT is
returned as is, other settings, base model or data are refused unless ``overwrite``. Only safetensors and JSON
remain at the end: the Trainer's optimizer, scheduler and RNG state (``torch.save``) is read back with
``torch.load(weights_only=True)``, training_args.bin (a pickle) is deleted as soon as it appears,
OUT/checkpoints/ is removed unless kept. The command-line flags are generated from ``FinetuneConfig``
(``settings_cli``). torch, transformers, trl and peft are imported inside functions: importing this is instant.
"""

from __future__ import annotations

import sys
import time
import warnings
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path

from distill_detect import settings_cli
from distill_detect.backends.base import END_OF_TURN
from distill_detect.checkpoint_dir import CheckpointDir, no_pickle_callback, read_json, rows_hash
from distill_detect.errors import ConfigError, DistillDetectError, InputError, require
from distill_detect.models import quiet_progress_bars
from distill_detect.settings_cli import BOOL, FRACTION, NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE, POSITIVE_INT, is_number
from distill_detect.settings_cli import POSITIVE_INT_OR_NONE as POS_INT_OR_NONE
from distill_detect.types import Question

MARKER = "distill_detect_finetune.json"  # written last into OUT: the fine-tune completed
CHECKPOINTS = "checkpoints"  # OUT/checkpoints/: the Trainer's checkpoints while it runs
RUN_FILE = "distill_detect_run.json"  # OUT/checkpoints/RUN_FILE: what the interrupted run was
ADAPTER_DIR = "adapter"  # OUT/adapter/: the LoRA adapter on its own
_LOCK, _TMP = ".distill_detect_finetune.lock", ".final-"  # OUT's lock file; prefix of the final save's staging folder
_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt")
_DTYPES = ("auto", "float32", "bfloat16", "float16")
_NOT_IN_KEY = ("save_steps", "save_total_limit", "keep_checkpoints", "threads")  # may change between a run and its resume
_opt = partial(settings_cli.option, group="training", sft=None)  # sft: the field's SFTConfig name (True: the same name)
_LR = (lambda v: is_number(v) and 0 < v < 1, "give a value in (0, 1), e.g. 1e-5 (paper) or 1e-4 (small models)")
_SEQ = (lambda v: settings_cli.is_int(v) and v >= 16, "give an integer >= 16 that fits a prompt and its response, e.g. 1024")
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
    epochs: float = _opt(5, POSITIVE, "passes over the training data (paper: 5); fractions are allowed", sft="num_train_epochs",
                        type=settings_cli.number)
    learning_rate: float = _opt(1e-5, _LR, "peak AdamW learning rate (paper: 1e-5; small models need ~1e-4)", flag="--lr", sft=True)
    lr_scheduler: str = _opt("cosine", None, "schedule after warm-up (paper: cosine)", choices=_SCHEDULERS, sft="lr_scheduler_type")
    warmup_ratio: float = _opt(0.05, FRACTION, "fraction of the optimizer steps for a linear warm-up from 0 (paper: 5%)")
    weight_decay: float = _opt(1e-4, NON_NEGATIVE, "AdamW decoupled weight decay (paper: 1e-4)", sft=True)
    adam_beta1: float = _opt(0.9, FRACTION, "AdamW beta1 (paper: 0.9)", sft=True)
    adam_beta2: float = _opt(0.95, FRACTION, "AdamW beta2 (paper: 0.95)", sft=True)
    max_grad_norm: float = _opt(1.0, NON_NEGATIVE, "gradient clipping by global norm, 0 = off (the paper does not say)", sft=True)
    per_device_batch_size: int = _opt(8, POSITIVE_INT, "examples per forward pass; out of memory: lower it, raise --grad-accum",
                                      flag="--batch-size", sft="per_device_train_batch_size")
    gradient_accumulation_steps: int = _opt(1, POSITIVE_INT, "forward passes per optimizer step (global batch = batch size x this; "
                                            "paper: 8)", flag="--grad-accum", sft=True)
    max_seq_len: int = _opt(1024, _SEQ, "tokens per example (prompt + response + end-of-turn); longer responses are cut, "
                            "with a warning; a prompt that leaves no room is an error naming the question")
    max_steps: int | None = _opt(None, POS_INT_OR_NONE, "stop after N optimizer steps instead of after the epochs")
    seed: int = _opt(42, NON_NEGATIVE_INT, "seeds data order, LoRA init, dropout", sft=True)
    dtype: str = _opt("auto", None, "compute precision: float32, or bfloat16/float16 mixed precision over float32 weights; auto = "
                      "bfloat16 on a GPU that has it, else float32 (paper: bf16; slower on CPUs)", choices=_DTYPES)
    save_dtype: str = _opt("float32", None, "precision of the saved weights (bfloat16 halves the size but can round away "
                           "updates as small as lr 1e-5 makes)", choices=_DTYPES[1:])
    gradient_checkpointing: bool = _opt(False, BOOL, "recompute activations in the backward pass: less memory, ~30% slower")
    system_prompt: str | None = _opt(None, _STR_OR_NONE, "system turn of the prompts (default: the template's); audit with it too")
    threads: int | None = _opt(None, POS_INT_OR_NONE, "CPU threads for torch (default: torch's); 1 is fastest on a shared core")
    lora: bool = _opt(False, BOOL, "train a LoRA adapter, merged into the saved weights (the paper trains fully)", group="LoRA")
    lora_r: int = _opt(16, POSITIVE_INT, "LoRA rank", group="LoRA")
    lora_alpha: float = _opt(32, POSITIVE, "LoRA scaling numerator (updates are scaled by lora_alpha / lora_r)", group="LoRA")
    lora_dropout: float = _opt(0.05, FRACTION, "dropout on the LoRA branch's input", group="LoRA")
    lora_target_modules: str = _opt("all-linear", _MODULES, "'all-linear' (all but the output head) or names, e.g. q_proj,v_proj",
                                    group="LoRA")
    save_steps: int | None = _opt(None, POS_INT_OR_NONE, "checkpoint every N optimizer steps (default: each epoch)", group="checkpoints")
    save_total_limit: int = _opt(1, POSITIVE_INT, "checkpoints kept while training (the newest)", sft=True, group="checkpoints")
    keep_checkpoints: bool = _opt(False, BOOL, "keep OUT/checkpoints/ (optimizer state) at the end", group="checkpoints")
    # fmt: on

    def __post_init__(self) -> None:
        settings_cli.validate(self)

    @property
    def global_batch_size(self) -> int:
        """Examples per optimizer step on one device."""
        return self.per_device_batch_size * self.gradient_accumulation_steps

    def training_key(self) -> dict:
        """The settings that change the trained weights (compared when resuming)."""
        return {k: v for k, v in asdict(self).items() if k not in _NOT_IN_KEY}


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
    names = {f.name for f in fields(trl.SFTConfig)}  # transformers 5 renamed gradient_checkpointing; warmup_steps < 1 is a ratio
    version_kw = {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": config.gradient_checkpointing,
                  "warmup_ratio" if "warmup_ratio" in names else "warmup_steps": config.warmup_ratio}  # fmt: skip
    args = trl.SFTConfig(**same, **version_kw, max_steps=config.max_steps or -1, data_seed=config.seed, optim="adamw_torch",
                         save_strategy="epoch" if config.save_steps is None else "steps", save_steps=config.save_steps or 500,
                         bf16=dtype == "bfloat16", fp16=dtype == "float16", use_cpu=device == "cpu", output_dir=str(ckpt_dir),
                         max_length=max_len, completion_only_loss=True, include_num_input_tokens_seen="non_padding",
                         logging_steps=1, report_to="none", disable_tqdm=not show_bar, dataloader_num_workers=0)  # fmt: skip

    class LossBar(transformers.trainer_callback.ProgressCallback):  # a bar with the loss on it, not a dict per step
        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.training_bar is not None and logs and "loss" in logs:
                self.training_bar.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)

    collator = DataCollatorForLanguageModeling(pad_token_id=pad_id)  # passing ours: trl leaves the pad tokens alone
    trainer = trl.SFTTrainer(
        model, args, collator, Dataset.from_list(rows), processing_class=tok, callbacks=[no_pickle_callback(), *callbacks]
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


# -- the fine-tune -----------------------------------------------------------------------------------


def finetune(base_model, questions: list[Question], out_dir, config: FinetuneConfig | None = None, *,
             progress: bool = True, overwrite: bool = False, callbacks: list | None = None) -> Path:  # fmt: skip
    """Fine-tune ``base_model`` on the (question, response) pairs and write a checkpoint to ``out_dir``; returns it.

    ``base_model``: None or 'default' (the embedded SmolLM2-135M-Instruct), a checkpoint directory or a hub id.
    ``questions``: each needs a non-empty ``response`` (the teacher trace). ``progress``: status lines on stderr,
    and progress bars when it is a terminal; False: silent. ``overwrite``: replace a previous or interrupted
    fine-tune in ``out_dir`` instead of returning or resuming it. ``callbacks``: extra ``TrainerCallback`` objects.
    """
    from distill_detect.models import resolve_model

    config = config or FinetuneConfig()
    if not isinstance(config, FinetuneConfig):
        raise ConfigError(f"config must be a FinetuneConfig, got {type(config).__name__}")
    if not (questions := list(questions)):
        raise ConfigError("no training examples: give at least one question with a response")
    for q in questions:
        if not (isinstance(q.response, str) and q.response.strip()):
            raise InputError("training data", f"question {q.id!r} has no response to train on", field="response")
    require("datasets", "finetune", "trl")  # before any model is loaded
    ckpts = CheckpointDir(out_dir, marker=MARKER, checkpoints=CHECKPOINTS, run_file=RUN_FILE, lock_file=_LOCK, staging_prefix=_TMP,
                          what="fine-tune", log=partial(print, file=sys.stderr, flush=True) if progress else None)  # fmt: skip
    out = ckpts.path
    with quiet_progress_bars(progress and sys.stderr.isatty()):
        ref = resolve_model(base_model)  # may convert the embedded GGUF (once): its save bar is silenced too
        run = {
            "config": config.training_key(),
            "data_hash": rows_hash([q.id, q.text, q.response] for q in questions),
            "n_examples": len(questions),
        }
        run["base_model"] = dict(ref.identity)
        if Path(ref.location).exists() and out.resolve() == Path(ref.location).resolve():
            raise ConfigError(f"--out {str(out)!r} is the base model's own directory; choose a new directory")
        with ckpts.lock():
            if (done := ckpts.claim(run, overwrite=overwrite)) is not None:
                if not done.get("config", {}).get("keep_checkpoints", True):  # killed while removing them
                    ckpts.drop_checkpoints()
                ckpts.log(f"{out} already holds this fine-tune (completed); nothing to do")
                return out
            return _train(ref, questions, ckpts, config, progress, callbacks or [])


def _train(ref, questions, ckpts: CheckpointDir, config, progress, callbacks) -> Path:
    """Load, train with trl (resuming from the last complete checkpoint if any), save atomically, write the marker."""
    from distill_detect.models import load_hf

    torch, transformers = require("torch", "finetune", "Fine-tuning"), require("transformers", "finetune", "Fine-tuning")
    if config.threads:
        torch.set_num_threads(config.threads)
    out, ckpt_dir = ckpts.path, ckpts.checkpoints
    dtype, device = _resolve_precision(config)
    ckpts.log(f"Loading {ref.spec} ...")
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
    resume, state = ckpts.resume_point()
    resumed_from = {"checkpoint": resume.name, "global_step": state.get("global_step")} if resume else None
    ckpts.log(f"Fine-tuning on {len(questions)} examples ({'LoRA' if config.lora else 'full'}, {dtype}, {device}), "
                   f"{config.epochs:g} epochs at lr {config.learning_rate:g}, checkpoints in {ckpt_dir}")  # fmt: skip
    t_train = time.time()
    try:
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except KeyboardInterrupt:
        raise DistillDetectError(ckpts.interrupted_message()) from None
    except torch.OutOfMemoryError:  # pragma: no cover - needs a GPU
        raise DistillDetectError("out of memory while training; lower --batch-size (and raise --grad-accum to keep the global "
                                 "batch), lower --max-seq-len, or use --lora / --gradient-checkpointing") from None  # fmt: skip
    train_time, tokens = time.time() - t_train, trainer.state.num_input_tokens_seen - state.get("num_input_tokens_seen", 0)

    # Merge LoRA before measuring and saving, so the loss describes the checkpoint that is written.
    tmp, final = ckpts.staging(), trainer.model
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
        **ckpts.marker_head(),
        "base_model": {"spec": ref.spec, "location": ref.location, "identity": dict(ref.identity)},
        "config": asdict(config),
        "resolved": {"compute_dtype": dtype, "device": device, "max_seq_len": max_len, "global_batch_size": config.global_batch_size,
                     "total_steps": s.max_steps, "num_train_epochs": s.num_train_epochs},
        "data": {"hash": ckpts.run["data_hash"], "n_examples": len(data), "responses_truncated": trainer.responses_cut,
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
        **ckpts.marker_tail(("torch", "transformers", "accelerate", "peft", "trl", "datasets")),
    }  # fmt: skip
    ckpts.publish(tmp, meta)  # each file by an atomic rename, then the marker
    if not config.keep_checkpoints:
        ckpts.drop_checkpoints()
    rate = meta["train"]["tokens_per_second"] or 0
    ckpts.log(f"Wrote {out}: final train loss {final_loss:.4f} after {s.global_step} steps, {rate:.0f} tokens/s, {meta['wall_time_s']:.0f} s")  # fmt: skip
    return out


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


def config_from_args(args, cls=FinetuneConfig):
    """A config from parsed CLI arguments; options left out keep the config's defaults."""
    return settings_cli.config_from_args(args, cls)


def add_cli(subparsers):
    """Add the ``finetune`` subcommand to an argparse subparsers object; returns its parser."""
    import argparse

    p = subparsers.add_parser("finetune", epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                              help="distil a student: fine-tune a model on (question, response) pairs, loss on the response only",
                              description="Fine-tune a chat model on (question, response) pairs with the loss on the response "
                              "tokens only, in the model's chat template (the paper's distillation recipe), with trl. Full "
                              "fine-tuning or LoRA; resumable.")  # fmt: skip
    g = p.add_argument_group("input and output")
    g.add_argument("--model", default="default", help="base model: 'default' (embedded SmolLM2-135M-Instruct), a directory or a hub id")  # fmt: skip
    g.add_argument("--data", required=True, help="JSONL/CSV/JSON/Parquet file with questions and responses, or bundled:NAME")
    g.add_argument("--out", required=True, help="output directory for the fine-tuned checkpoint")
    g.add_argument("--field", default="question", help="field holding the question (default: %(default)s)")
    g.add_argument("--response-field", default="response", help="field holding the response to train on (default: %(default)s)")
    g.add_argument("--limit", type=int, help="train on the first N examples only")
    g.add_argument("--overwrite", action="store_true", help="replace a finished or interrupted fine-tune in --out, not resume it")
    settings_cli.add_config_args(
        p, FinetuneConfig, groups={"training": p.add_argument_group("training (defaults: the paper's recipe)")}
    )
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
    meta = read_json(out / MARKER) or {}
    loss, n = meta.get("train", {}).get("final_train_loss"), meta.get("data", {}).get("n_examples", len(questions))
    print(f"{out}\t{n} examples\tfinal train loss {loss:.4f}\t{meta.get('wall_time_s', 0):.0f} s" if loss is not None else out)
    return 0
