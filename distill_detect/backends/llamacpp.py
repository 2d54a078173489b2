"""Greedy decoding with per-token log-probabilities on llama.cpp (GGUF models on CPU).

Install with ``pip install 'distill-detect[llamacpp]'`` (builds llama.cpp from source).

The model is run through llama-cpp-python's low-level API, one ``llama_decode`` per step
for the whole batch (each question is its own sequence in one context). Each step asks
llama.cpp for the logits of the last position only and computes, with numpy on that one
row per question, the emitted token's log-softmax and the mean and standard deviation of
log p over the vocabulary. llama-cpp-python's own ``logprobs`` option is not used: it
needs every position's logits and does a full-vocabulary pass in Python per token.
Finished rows leave the step's batch and their cache cells are removed; the context's
memory is cleared between batches (``tests/test_llamacpp.py`` counts the calls).

What batching gains is bounded by llama.cpp's CPU kernels (this build: AVX2), not by this
loop. Measured at 1 thread on the 2-core Xeon with other jobs running (load ~2), 128 new
tokens, 8 gsm8k questions at batch 1 and 16 at batch 8, end to end: Q4_1 (the embedded
GGUF) 44.7 -> 59.1 tok/s (1.3x), f16 26.4 -> 57.7 (2.2x), q8_0 41.5 -> 74.7 (1.8x). A bare
``llama_decode`` step of the Q4_1 model (1 thread, 120-token contexts, load 1.4-2.6) took
17.5 ms at batch 1, 85.8 ms at 8 and 310 ms at 32 (57 / 93 / 103 tok/s), and 7.4 ms per
prompt token in the prefill: the quantised dot-product kernels are compute-bound already
at batch 1, so eight rows cost nearly eight times one. CPU flash attention would save
5-8% (78.9 ms at batch 8) but makes a sequence's numbers depend on its batch-mates (below);
a unified KV cache was slower (104.9 ms at 8, 737 ms at 32).

The prompt is the GGUF's own chat template (``tokenizer.chat_template``), rendered like
transformers renders it and tokenised by llama.cpp with special tokens parsed; on the
embedded SmolLM2 GGUF the token ids equal the HF backend's. A question stops at the same
tokens as in the HF backend: EOS, EOT and the usual end-of-turn tokens.

Agreement with the HF backend on the same model. A GGUF's quantised weights (Q4_1 for the
embedded model) are dequantised to float32 for HF, while llama.cpp multiplies them with
8-bit-quantised activations, so the two are close but not equal. Measured on
SmolLM2-135M-Instruct, 24 gsm8k questions x 128 tokens (benchmarks/results/speed.md): on
the prefix where the greedy tokens are identical, |Δ log p| <= 0.24; the greedy paths part
after about half the tokens on average (where two candidates are near-tied), and a few
questions differ from the first token or two. Teacher-forcing the HF tokens through
llama.cpp: |Δ log p| up to ~0.4. Stated tolerance, held by ``tests/test_llamacpp.py``:
|Δ log p| <= 0.3 on the identical prefix, <= 0.5 teacher-forced, and the first 4 greedy
tokens identical on all but one of 4 questions.

Any student: ``--model`` may be a Hugging Face checkpoint folder (a ``distill-detect finetune`` output, a
Llama-architecture model); it is converted once to GGUF at ``gguf_quant`` ('f16' by default, or 'q8_0') and
cached under ``<cache>/gguf/<checkpoint hash>-<quant>.gguf`` (``distill_detect.gguf_convert``), its tokenizer
checked against the checkpoint's own. Measured on the embedded model's float32 checkpoint, the first 8
bundled:gsm8k_test questions x 64 tokens, 1 thread, against the HF backend in float32: f16 gives the same greedy
text on 8/8, |Δ log p| <= 0.0103 on the generated tokens and <= 0.0151 on the question's (tolerance held by
``tests/test_gguf_convert.py``: 0.03); q8_0 the same text on 1/8, the greedy paths identical on 47% of
their common length, |Δ log p| <= 0.24 there, 0.58 on the question's tokens (llama.cpp multiplies 8-bit weights
with 8-bit-quantised activations; the weights alone are within 0.6% of float32).

Within this backend, batch size changes nothing (identical tokens and log-probabilities):
each prompt is fed in its own ``llama_decode`` calls, and llama.cpp's CPU flash attention
(which gives a sequence different numbers when others share its batch) is switched off.
The prompt prefill and the one-token decoding steps go through different kernels, so
``score`` (teacher forcing) and ``generate`` on the same tokens agree only to ~0.15.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from distill_detect.backends.base import (
    END_OF_TURN,
    Backend,
    Sampled,
    cpu_threads,
    require_stop_ids,
    sample_from_logits,
    sample_rng,
)
from distill_detect.errors import ConfigError, DistillDetectError, require
from distill_detect.types import Question, Trace

_N_BATCH = 512  # tokens per llama_decode call during prefill


def resolve_gguf(spec: str | None, quant: str | None = None) -> tuple[Path, dict]:
    """(GGUF path, identity extras) for ``--model``: 'default'/None (the embedded SmolLM2 GGUF), a .gguf file,
    a folder holding exactly one, or a Hugging Face checkpoint folder (converted to GGUF at ``quant``, f16 by
    default, and cached: ``distill_detect.gguf_convert``). ``quant`` with 'default' converts the embedded
    model's dequantised float32 checkpoint (the HF backend's weights) instead of using its Q4_1 file."""
    from distill_detect.gguf_convert import QUANTS, checkpoint_hash, ensure_gguf

    if quant is not None and quant not in QUANTS:
        raise ConfigError(f"--gguf-quant {quant!r}: choose {' or '.join(QUANTS)}")

    def converted(folder: Path) -> tuple[Path, dict]:
        q = quant or "f16"
        return ensure_gguf(folder, q), {"checkpoint_sha256": checkpoint_hash(folder)[:24], "gguf_quant": q}

    if spec in (None, "", "default"):
        from distill_detect.models import default_model_dir, find_default_gguf

        return (find_default_gguf(), {}) if quant is None else converted(default_model_dir())
    p = Path(spec).expanduser()
    if p.is_dir() and (p / "config.json").is_file():
        return converted(p.resolve())
    if quant is not None and p.exists():
        raise ConfigError(f"--gguf-quant {quant}: only for a Hugging Face checkpoint folder; {spec!r} is already a GGUF")
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise ConfigError(f"--model {spec!r}: the llamacpp backend loads GGUF files (*.gguf) or checkpoint folders")
        return p.resolve(), {}
    if p.is_dir():
        found = sorted(p.glob("*.gguf"))
        if len(found) == 1:
            return found[0].resolve(), {}
        raise ConfigError(
            f"--model {spec!r}: expected one .gguf file in the folder, or a checkpoint folder with a config.json; "
            f"found {len(found)} .gguf files"
        )
    raise ConfigError(
        f"--model {spec!r}: no such GGUF file or checkpoint folder (the llamacpp backend cannot download hub models)"
    )


def gguf_sha256(path: Path) -> str:
    """sha256 of a GGUF file, remembered in the cache folder by (path, size, mtime): big files hash once."""
    from distill_detect.models import cache_dir, sha256_file

    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{int(st.st_mtime)}"
    memo = cache_dir() / "gguf_sha256.json"
    try:
        known = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return known[key]
    digest = sha256_file(path)
    known[key] = digest
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known))
        os.replace(tmp, memo)
    except OSError:  # a read-only cache still works, it just hashes again next time
        pass
    return digest


def _render(template: str, question: str, system_prompt: str | None, bos: str, eos: str) -> str:
    """The chat template rendered the way transformers renders it (sandboxed Jinja, same options)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from distill_detect.prompts import messages_for

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(
        messages=messages_for(question, system_prompt), add_generation_prompt=True, bos_token=bos, eos_token=eos
    )


def _row_stats(x: np.ndarray, target: np.ndarray):
    """Rows of logits [n, V] -> (token, log p(token), E_p[log p], std_p[log p]), all on one exponential pass.

    ``target[i] < 0`` means the greedy token (the argmax, where z = 0 so log p = -log S).
    """
    am = x.argmax(axis=1)
    r = np.arange(x.shape[0])
    z = x - x[r, am][:, None]
    e = np.exp(z)
    s = e.sum(axis=1, dtype=np.float64)
    ez = e * z
    a = ez.sum(axis=1, dtype=np.float64) / s
    b = np.einsum("ij,ij->i", ez, z, dtype=np.float64) / s
    lse = np.log(s)
    tok = np.where(target < 0, am, target)
    lp = z[r, tok].astype(np.float64) - lse
    return tok, lp.astype(np.float32), (a - lse).astype(np.float32), np.sqrt(np.maximum(b - a * a, 0.0)).astype(np.float32)


class GGUFTokenizer:
    """A GGUF model's tokenizer behind the three calls ``build_token_freq_table`` makes.

    ``len(tok)`` is the vocabulary size, ``tok(texts, add_special_tokens=False)`` returns
    ``{"input_ids": [[...], ...]}`` (plain text: special-token markup in the text is not parsed),
    and ``cache_key()`` names the vocabulary for the table's on-disk cache.
    """

    def __init__(self, backend: LlamaCppBackend):
        self._b = backend

    def __len__(self) -> int:
        return self._b.n_vocab

    def __call__(self, texts, add_special_tokens: bool = False):
        if isinstance(texts, str):
            texts = [texts]
        llm = self._b.llm
        ids = [llm.tokenize(t.encode("utf-8"), add_bos=bool(add_special_tokens), special=False) for t in texts]
        return {"input_ids": ids}

    def cache_key(self) -> str:
        return "gguf-" + self._b.identity["gguf_sha256"][:16]


class LlamaCppBackend(Backend):
    name = "llamacpp"
    capabilities = frozenset({"output_logprobs", "output_stats", "prompt_logprobs", "prompt_stats", "score", "samples"})
    cli_options = {"threads": "n_threads"}
    ABLATIONS = {
        "logprobs": "read only the argmax at each step: log-probabilities and statistics are zeros (measures their cost)"
    }
    """What ``ablate`` can switch off (``benchmarks/speed.py``); traces made so are useless for detection."""

    def __init__(
        self,
        model: str | None = None, *, dtype: str = "auto", device: str = "auto", system_prompt: str | None = None,
        prompt_logprobs: bool = True, trust_remote_code: bool = False,  # the options every backend takes (base.py)
        n_threads: int | None = None, gguf_quant: str | None = None,
        ablate: frozenset[str] | set[str] = frozenset(),
    ):  # fmt: skip
        """``model``: 'default'/None (the embedded SmolLM2 GGUF), a .gguf file, a folder with one, or a Hugging
        Face checkpoint folder, converted once to GGUF at ``gguf_quant`` ('f16', the default, or 'q8_0')."""
        if set(ablate) - set(self.ABLATIONS):
            raise ConfigError(
                f"ablate: unknown {sorted(set(ablate) - set(self.ABLATIONS))[0]!r}; known: {', '.join(self.ABLATIONS)}"
            )
        self.ablate = frozenset(ablate)
        self.lc = require("llama_cpp", "llamacpp", "The llamacpp backend")
        if dtype not in ("auto", None):
            raise ConfigError(f"--dtype {dtype!r}: the llamacpp backend runs the GGUF's own weights; leave --dtype out")
        if device not in ("auto", "cpu", None):
            raise ConfigError(f"--device {device!r}: the llamacpp backend runs on the CPU; use --backend hf for a GPU")
        self.path, converted = resolve_gguf(model, gguf_quant)
        self.n_threads = cpu_threads(n_threads)
        try:
            # This context is only for tokenising; decoding uses contexts sized per batch (below).
            self.llm = self.lc.Llama(
                str(self.path), n_ctx=64, n_batch=64, n_threads=self.n_threads, logits_all=False, verbose=False
            )
        except (ValueError, RuntimeError) as exc:
            raise DistillDetectError(f"llama.cpp could not load {self.path} ({exc})") from None
        meta = self.llm.metadata
        identity = {"name": meta.get("general.name") or self.path.name, "gguf_sha256": gguf_sha256(self.path), **converted}
        self.setup_common(
            identity=identity, location=str(self.path), system_prompt=system_prompt, prompt_logprobs=prompt_logprobs
        )
        self.template = meta.get("tokenizer.chat_template")
        if not self.template:
            raise ConfigError(f"{self.path} has no chat template (tokenizer.chat_template); distill-detect audits chat models")
        self.vocab = self.lc.llama_model_get_vocab(self.llm.model)
        self.n_vocab = int(self.lc.llama_vocab_n_tokens(self.vocab))
        self.context = int(self.lc.llama_model_n_ctx_train(self.llm.model)) or None
        self._bos = self._piece(self.lc.llama_vocab_bos(self.vocab))
        self._eos = self._piece(self.lc.llama_vocab_eos(self.vocab))
        self.stop_ids = self._stop_ids()
        probe = _render(self.template, "\x00QUESTION\x00", system_prompt, self._bos, self._eos)
        self._template_hash = hashlib.sha256((self.template + "\n" + probe).encode()).hexdigest()[:16]
        self.file_type = self._file_type(meta.get("general.file_type"))
        self._ctx = None
        self._ctx_shape = (0, 0)  # (sequences, positions per sequence)
        self._batch = None
        self._batch_cap = 0

    # -- vocabulary and prompts ------------------------------------------------------------------

    @property
    def tok(self) -> GGUFTokenizer:
        """The GGUF's own tokenizer, in the shape DC-PDD's frequency table needs (no transformers)."""
        return GGUFTokenizer(self)

    def _piece(self, token: int) -> str:
        if token is None or token < 0:
            return ""
        return self.llm.detokenize([int(token)], special=True).decode("utf-8", errors="replace")

    def _stop_ids(self) -> set[int]:
        ids = {
            int(t) for t in (self.lc.llama_vocab_eos(self.vocab), self.lc.llama_vocab_eot(self.vocab)) if t is not None and t >= 0
        }
        for text in END_OF_TURN:
            toks = self.llm.tokenize(text.encode(), add_bos=False, special=True)
            if len(toks) == 1 and self._piece(toks[0]) == text:
                ids.add(int(toks[0]))
        return require_stop_ids(ids, str(self.path))

    @staticmethod
    def _file_type(code) -> str:
        names = {
            0: "F32",
            1: "F16",
            2: "Q4_0",
            3: "Q4_1",
            7: "Q8_0",
            8: "Q5_0",
            9: "Q5_1",
            10: "Q2_K",
            15: "Q4_K_M",
            17: "Q5_K_M",
            18: "Q6_K",
            32: "BF16",
        }
        try:
            return names.get(int(code), f"gguf_ftype_{int(code)}")
        except (TypeError, ValueError):
            return "unknown"

    def render(self, question: str) -> str:
        return _render(self.template, question, self.system_prompt, self._bos, self._eos)

    def prompt_ids(self, question: str) -> list[int]:
        return self.llm.tokenize(self.render(question).encode("utf-8"), add_bos=False, special=True)

    def build_prompt(self, question: str) -> tuple[list[int], tuple[int, int]]:
        """(token ids, [start, end) of the question's tokens), the same rule as prompts.build_prompt."""
        text = self.render(question)
        ids = self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        start_char = text.rfind(question)
        if start_char < 0:
            return ids, (len(ids), len(ids))
        a = len(text[:start_char].encode("utf-8"))
        b = a + len(question.encode("utf-8"))
        inside, pos = [], 0
        pieces = [self.llm.detokenize([t], special=True) for t in ids]
        if b"".join(pieces) != text.encode("utf-8"):  # a tokenizer that does not round-trip: score nothing
            return ids, (len(ids), len(ids))
        for i, pc in enumerate(pieces):
            if pos + len(pc) > a and pos < b:
                inside.append(i)
            pos += len(pc)
        if not inside:
            return ids, (len(ids), len(ids))
        return ids, (max(inside[0], 1), inside[-1] + 1)

    def fingerprint(self) -> dict:
        return self.base_fingerprint(
            dtype=self.file_type,
            device="cpu",
            versions={"llama_cpp_python": getattr(self.lc, "__version__", "unknown")},
            template=self._template_hash,
            stop_ids=self.stop_ids,
        )

    # -- the llama.cpp context ---------------------------------------------------------------------

    def _ensure(self, n_seq: int, per_seq: int, n_tokens: int) -> None:
        """A context with room for ``n_seq`` sequences of ``per_seq`` positions, and a batch of ``n_tokens``."""
        lc = self.lc
        per_seq = -(-per_seq // 256) * 256
        if self.context:
            per_seq = min(per_seq, self.context)
        have_seq, have_pos = self._ctx_shape
        limit = int(lc.llama_max_parallel_sequences())
        if n_seq > limit:
            raise ConfigError(f"--batch-size {n_seq}: llama.cpp decodes at most {limit} sequences together")
        if self._ctx is None or n_seq > have_seq or per_seq > have_pos:
            if self._ctx is not None:
                lc.llama_free(self._ctx)
                self._ctx = None
            n_seq, per_seq = max(n_seq, have_seq), max(per_seq, have_pos)
            p = lc.llama_context_default_params()
            p.n_ctx = n_seq * per_seq
            p.n_batch = p.n_ubatch = _N_BATCH
            p.n_seq_max = n_seq
            p.n_threads = p.n_threads_batch = self.n_threads
            p.kv_unified = False  # each sequence attends over its own cells only
            # llama.cpp's CPU flash attention gives a sequence different numbers (up to ~0.15 nats here) when
            # other sequences share its batch; the plain attention path does not, so batching cannot change results.
            p.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
            p.no_perf = True
            ctx = lc.llama_init_from_model(self.llm.model, p)
            if not ctx:
                raise DistillDetectError(f"llama.cpp could not create a context for {n_seq} sequences of {per_seq} tokens")
            self._ctx, self._ctx_shape = ctx, (n_seq, per_seq)
        else:
            lc.llama_memory_clear(lc.llama_get_memory(self._ctx), True)
        if self._batch is None or n_tokens > self._batch_cap:
            if self._batch is not None:
                lc.llama_batch_free(self._batch)
            cap = max(n_tokens, _N_BATCH)
            self._batch = lc.llama_batch_init(cap, 0, 1)
            self._batch_cap = cap

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> np.ndarray:
        """Decode (token, position, sequence, wants_logits) entries; returns the logits rows [n_out, V]."""
        lc, batch = self.lc, self._batch
        for i, (tok, pos, seq, out) in enumerate(entries):
            batch.token[i] = tok
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = out
        batch.n_tokens = len(entries)
        rc = lc.llama_decode(self._ctx, batch)
        if rc != 0:
            raise DistillDetectError(f"llama_decode failed (code {rc}); the context may be too small for this batch")
        rows = [i for i, e in enumerate(entries) if e[3]]
        if not rows:
            return np.zeros((0, self.n_vocab), np.float32)
        # llama_get_logits_ith maps a batch index to its output row, whatever order llama.cpp computed them in.
        V = self.n_vocab
        out = np.empty((len(rows), V), np.float32)
        for k, i in enumerate(rows):
            ptr = lc.llama_get_logits_ith(self._ctx, i)
            if not ptr:
                raise DistillDetectError(f"llama.cpp returned no logits for batch entry {i}")
            out[k] = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(V,))
        return out

    def _prefill(self, seqs: list[list[int]], wanted: list[list[int]], last_logits: dict | None = None) -> list[dict]:
        """Feed every sequence; for each position j in ``wanted[i]`` return the stats of the logits there:
        teacher-forced on seqs[i][j + 1] where it exists, else the greedy token. Returns [{j: (tok, lp, mean, std)}].
        ``last_logits``: a dict that receives {i: logits row [V] at sequence i's last position} (for sampling)."""
        res: list[dict] = [{} for _ in seqs]
        entries: list[tuple[int, int, int, bool]] = []
        owners: list[tuple[int, int]] = []

        def flush():
            if not entries:
                return
            x = self._decode(entries)
            if len(owners):
                tgt = np.asarray([seqs[i][j + 1] if j + 1 < len(seqs[i]) else -1 for i, j in owners], dtype=np.int64)
                tok, lp, mean, std = _row_stats(x, tgt)
                for k, (i, j) in enumerate(owners):
                    res[i][j] = (int(tok[k]), float(lp[k]), float(mean[k]), float(std[k]))
                    if last_logits is not None and j == len(seqs[i]) - 1:
                        last_logits[i] = x[k].copy()
            entries.clear()
            owners.clear()

        for i, s in enumerate(seqs):
            want = set(wanted[i])
            for j, t in enumerate(s):
                out = j in want
                entries.append((int(t), j, i, out))
                if out:
                    owners.append((i, j))
                if len(entries) == _N_BATCH:
                    flush()
            # One sequence per call: llama.cpp's kernels depend on how many tokens a call holds, so a
            # prompt is always cut the same way whatever else is in the batch.
            flush()
        return res

    # -- the interface ---------------------------------------------------------------------------

    def generate(self, questions: Sequence[Question], *, max_new_tokens: int) -> list[Trace]:
        return self._run(questions, max_new_tokens)

    def sample(self, requests, *, temperature: float, top_p: float, seed: int, max_new_tokens: int) -> list[Sampled]:
        """Answers sampled by the same decoding loop as ``generate`` (``base.sample_from_logits``), one
        sequence per (question, k), each with its own random stream (``sample_rng``)."""
        rngs = [sample_rng(seed, q.id, k) for q, k in requests]

        def pick(x, rows):
            u = np.asarray([rngs[i].random() for i in rows])
            return sample_from_logits(x, u, temperature, top_p)

        traces = self._run([q for q, _ in requests], max_new_tokens, pick=pick)
        return [Sampled(t.output_text or "", t.num_tokens, t.finish_reason) for t in traces]

    def _run(self, questions: Sequence[Question], max_new_tokens: int, pick=None) -> list[Trace]:
        """The decoding loop: greedy, or ``pick(logits [n, V], sequence indices) -> tokens`` (no prompt log-probs)."""
        want_prompt = self.want_prompt_logprobs and pick is None
        prompts = [self.build_prompt(q.text) for q in questions]
        for q, (ids, _) in zip(questions, prompts):
            self._check_length(q, len(ids))
        B = len(questions)
        longest = max(len(ids) for ids, _ in prompts)
        steps = max_new_tokens if not self.context else max(1, min(max_new_tokens, self.context - longest))
        self._ensure(B, longest + steps, max(B, _N_BATCH))
        wanted = []
        for ids, (s, e) in prompts:
            w = [len(ids) - 1]
            if want_prompt and e > s:
                w = list(range(s - 1, e - 1)) + w
            wanted.append(w)
        last_logits: dict | None = {} if pick is not None else None
        pre = self._prefill([ids for ids, _ in prompts], wanted, last_logits)
        first_pick = pick(np.stack([last_logits[i] for i in range(B)]), list(range(B))) if pick is not None else None

        toks = [[] for _ in range(B)]
        vals = [[] for _ in range(B)]  # (lp, mean, std) per step
        finish = ["length"] * B
        active = []
        for i, (ids, _) in enumerate(prompts):
            tok, lp, mean, std = pre[i][len(ids) - 1]
            if first_pick is not None:
                tok = int(first_pick[i])
            toks[i].append(tok)
            vals[i].append((lp, mean, std))
            if tok in self.stop_ids:
                finish[i] = "stop"
            elif steps > 1:
                active.append(i)
        for step in range(1, steps):
            if not active:
                break
            x = self._decode([(toks[i][-1], len(prompts[i][0]) + step - 1, i, True) for i in active])
            tok, lp, mean, std = self._emit(x)
            if pick is not None:
                tok = pick(x, active)
            still = []
            for r, i in enumerate(active):
                t = int(tok[r])
                toks[i].append(t)
                vals[i].append((float(lp[r]), float(mean[r]), float(std[r])))
                if t in self.stop_ids:
                    finish[i] = "stop"
                elif step < steps - 1:
                    still.append(i)
            if len(still) < len(active):
                mem = self.lc.llama_get_memory(self._ctx)
                for i in set(active) - set(still):
                    self.lc.llama_memory_seq_rm(mem, i, -1, -1)
            active = still

        traces = []
        for i, q in enumerate(questions):
            ids, (s, e) = prompts[i]
            v = np.asarray(vals[i], np.float32).reshape(-1, 3)
            extra = {}
            if want_prompt:
                extra = self._prompt_fields(ids, (s, e), pre[i])
            traces.append(
                Trace(
                    id=q.id,
                    question=q.text,
                    label=q.label,
                    output_ids=np.asarray(toks[i], np.int32),
                    output_logprobs=v[:, 0],
                    output_mean_logp=v[:, 1],
                    output_std_logp=v[:, 2],
                    output_text=self.llm.detokenize(toks[i]).decode("utf-8", errors="replace"),
                    finish_reason=finish[i],
                    max_new_tokens=max_new_tokens,
                    **extra,
                )
            )
        return traces

    def _emit(self, x: np.ndarray):
        """Greedy step on last-position logits [n, V] -> (tokens, log p, mean, std of log p)."""
        if "logprobs" in self.ablate:
            return (x.argmax(axis=1),) + (np.zeros(x.shape[0], np.float32),) * 3
        return _row_stats(x, np.full(x.shape[0], -1, np.int64))

    @staticmethod
    def _prompt_fields(ids: list[int], span: tuple[int, int], got: dict) -> dict:
        s, e = span
        if e <= s:
            return {"prompt_ids": np.zeros(0, np.int32), "prompt_logprobs": np.zeros(0, np.float32)}
        rows = np.asarray([got[j][1:] for j in range(s - 1, e - 1)], np.float32).reshape(-1, 3)
        return {
            "prompt_ids": np.asarray(ids[s:e], np.int32),
            "prompt_logprobs": rows[:, 0],
            "prompt_mean_logp": rows[:, 1],
            "prompt_std_logp": rows[:, 2],
        }

    def score_prompts(self, questions: Sequence[Question]) -> list[dict]:
        prompts = [self.build_prompt(q.text) for q in questions]
        for q, (ids, _) in zip(questions, prompts):
            self._check_length(q, len(ids))
        self._ensure(len(prompts), max(len(ids) for ids, _ in prompts) + 1, _N_BATCH)
        wanted = [list(range(s - 1, e - 1)) if e > s else [] for _, (s, e) in prompts]
        got = self._prefill([ids for ids, _ in prompts], wanted)
        return [self._prompt_fields(ids, span, g) for (ids, span), g in zip(prompts, got)]

    def score(self, questions: Sequence[Question], continuations: Sequence[np.ndarray]) -> list[np.ndarray]:
        seqs, wanted = [], []
        for q, c in zip(questions, continuations):
            ids = self.prompt_ids(q.text)
            full = ids + [int(t) for t in c]
            self._check_length(q, len(full))
            seqs.append(full)
            wanted.append(list(range(len(ids) - 1, len(full) - 1)))
        self._ensure(len(seqs), max(len(s) for s in seqs) + 1, _N_BATCH)
        got = self._prefill(seqs, wanted)
        return [np.asarray([g[j][1] for j in w], np.float32) for g, w in zip(got, wanted)]

    def close(self) -> None:
        lc = self.lc
        if self._batch is not None:
            lc.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx is not None:
            lc.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "llm", None) is not None:
            self.llm.close()
            self.llm = None

    def __del__(self):  # pragma: no cover - best effort at interpreter exit
        try:
            self.close()
        except Exception:
            pass
