"""Greedy traces from an OpenAI-compatible HTTP server (vLLM, llama-cpp-python, SGLang, OpenAI, ...).

Requests are greedy (``temperature=0``) and ask for the log-probability of every
emitted token, through one of two endpoints:

* ``/v1/completions`` (default): the prompt is rendered here with the model's own chat
  template (a local tokenizer is needed: ``tokenizer=DIR``, by default the embedded
  model's for ``model='default'``) and sent as text, so the prompt is exactly the one
  the HF backend builds. Log-probs come back as ``logprobs.token_logprobs`` (OpenAI's
  legacy completions format, which vLLM and llama-cpp-python follow).
* ``/v1/chat/completions``: the server applies its own template; log-probs come back as
  ``logprobs.content[i].logprob`` (``logprobs=true``, ``top_logprobs=1``).

What an API can give, and what it cannot:

* ``output_logprobs``: always (that is what TPD reads). A response without them is an
  error that says so, never a silently empty trace.
* ``output_ids``: APIs return token *strings*. They are turned back into ids with the
  local tokenizer when that is exact (each piece maps to one vocabulary entry, or the
  re-tokenised text decodes to the same pieces); vLLM's ``return_tokens_as_token_ids``
  (``token_id:N`` strings) is read directly. Otherwise ``output_ids`` is None.
* ``prompt_logprobs`` of the question tokens: only where the server echoes the prompt
  with log-probabilities (``echo=true`` + ``logprobs`` on ``/v1/completions``; vLLM and
  llama-cpp-python do, OpenAI's hosted models do not). Probed once at start-up.
* Full-vocabulary statistics (``output_stats``/``prompt_stats``) and teacher-forcing a
  given continuation (``score``): never; APIs return at most the top-20 log-probs.

The end-of-turn token: the HF backend keeps the stop token (and its probability) as the
last token of a trace that ended by itself. Servers usually leave it out of the
log-probs; compare traces on their common prefix.

Greedy check: with ``top_logprobs=1`` the server also says which token was the most
likely at each step. If it emitted another one (llama.cpp's default ``repeat_penalty``
of 1.1 does that), the trace is not a greedy trace of the raw model and is refused with
the fix (``extra_body={"repeat_penalty": 1.0}``).

Reproducibility: a server's numbers can depend on its history. llama-cpp-python reuses the
evaluated prefix of the previous request (the shared system prompt), and its quantised
kernels round differently for other batch splits: the same request gave log-probs up to
0.14 apart in our tests (tokens identical). vLLM's prefix caching has the same effect.

Log-probabilities off (``logprobs=False``, ``--no-logprobs``): for servers that return only
text. Greedy answers are then text-only traces (``output_logprobs`` None), the fingerprint says
``"logprobs": false``, and only the text-only methods can run (``detectors.TEXT_ONLY``).

Sampled answers (``sample``): ``temperature``/``top_p`` with a ``seed`` per request. The
answers of one question in one batch are asked for with ``n`` in one request where the server
honours it (answers differ and there are n of them); otherwise, and from then on, one request
per answer, each with its own seed (``base.sample_seed``). Whether a server's sampling is
reproducible for a seed is the server's matter (vLLM: yes; llama-cpp-python: with one slot).

Transient failures are retried: HTTP 408/409/429/5xx, timeouts and dropped connections by
the openai client's own policy (``max_retries``: exponential backoff with jitter, honouring
``Retry-After``), and a 200 answer whose JSON body is truncated or malformed, which the
client does not retry, by a small retry here (tenacity, ``backoff``/``max_backoff``). Other
errors (400, 401, 404) fail at once. The API key is read from an environment variable
(``api_key_env``, default ``OPENAI_API_KEY``) and is never stored in the fingerprint,
printed or logged. Requests are sent ``concurrency`` at a time (threads).

References: OpenAI API reference for ``/v1/completions`` (``logprobs``, ``echo``) and
``/v1/chat/completions`` (``logprobs``, ``top_logprobs``); vLLM's OpenAI-compatible
server docs (``prompt_logprobs``, ``return_tokens_as_token_ids``).
"""

from __future__ import annotations

import os
import re
import threading
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from distill_detect.backends.base import Backend, Sampled, sample_seed, stop_token_ids
from distill_detect.errors import ConfigError, DistillDetectError, require
from distill_detect.types import Question, Trace

_TOKEN_ID = re.compile(r"^token_id:(-?\d+)$")


class NoLogprobsError(DistillDetectError):
    """The server answered without the log-probabilities that were asked for."""


class ServerError(DistillDetectError):
    """The server kept failing (after retries) or refused the request."""


class _BadBody(Exception):
    """A 200 answer whose JSON body is truncated or malformed (worth asking again)."""


def _clean_url(url: str) -> str:
    """The base URL without user:password@ or a query string (safe to store and print)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))


class OpenAIBackend(Backend):
    name = "openai"
    capabilities = frozenset({"output_logprobs", "samples"})
    conditional_capabilities = {
        "output_ids": "with the served model's tokenizer available locally (--tokenizer DIR), or token ids from the server",
        "prompt_logprobs": "on /v1/completions when the server echoes prompt log-probabilities (echo + logprobs: vLLM, llama-cpp-python)",
    }
    """Capabilities that depend on the server or the local tokenizer (checked at start-up)."""
    cli_options = {
        "base_url": "base_url",
        "api_key_env": "api_key_env",
        "endpoint": "endpoint",
        "tokenizer": "tokenizer",
        "concurrency": "concurrency",
        "extra_body": "extra_body",
    }
    logprobs: bool = True
    """Ask for the generated tokens' log-probabilities (False: text only, ``text_only()``)."""

    def __init__(
        self,
        model: str | None = None,
        *,
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        endpoint: str = "completions",
        tokenizer: str | None = None,
        system_prompt: str | None = None,
        prompt_logprobs: bool = True,
        concurrency: int = 4,
        max_retries: int = 5,
        timeout: float = 120.0,
        backoff: float = 0.5,
        max_backoff: float = 20.0,
        extra_body: dict | None = None,
        check_greedy: bool = True,
        client=None,
        logprobs: bool = True,
    ):
        """``model``: the served model name ('default'/None: the server's only model).

        ``tokenizer``: a local directory (or hub id) whose tokenizer and chat template match
        the served model; for ``model='default'`` the embedded SmolLM2's. Needed for
        ``endpoint='completions'``, optional for ``'chat'`` (it then maps tokens to ids).
        ``extra_body``: server-specific request fields (e.g. ``{"repeat_penalty": 1.0}`` for
        llama.cpp), part of the fingerprint. ``client``: an ``openai.OpenAI`` to use (tests).
        """
        openai = require("openai", "openai", "The openai backend")
        self._tenacity = require("tenacity", "openai", "The openai backend")
        if not base_url:
            raise ConfigError("--backend openai needs --base-url, e.g. http://127.0.0.1:8000/v1")
        if endpoint not in ("completions", "chat"):
            raise ConfigError(f"endpoint {endpoint!r}: choose 'completions' (/v1/completions) or 'chat' (/v1/chat/completions)")
        for name, v, lo in (("concurrency", concurrency, 1), ("max_retries", max_retries, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"{name} must be an integer >= {lo}, got {v!r}")
        if not (isinstance(api_key_env, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", api_key_env)):
            raise ConfigError(f"--api-key-env expects the NAME of an environment variable, got {api_key_env!r}")
        self.base_url = _clean_url(base_url)
        self.location = None  # an API run cannot be reloaded by later passes; they need the server again
        self.endpoint = endpoint
        self.system_prompt = system_prompt
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.extra_body = dict(extra_body or {})
        self.check_greedy = check_greedy
        self._openai = openai
        self._api_key_env = api_key_env
        # Local servers need no key; the client insists on a non-empty string.
        key = os.environ.get(api_key_env) or "no-key"
        # HTTP-level retries are the client's own (408/409/429/5xx, timeouts, dropped connections).
        self._client = client or openai.OpenAI(base_url=base_url, api_key=key, max_retries=max_retries, timeout=timeout)
        del key
        self.model_name = self._resolve_model(model)
        self.tok = self._load_tokenizer(tokenizer, model)
        if endpoint == "completions" and self.tok is None:
            raise ConfigError(
                "the /v1/completions endpoint needs the model's chat template to render the prompt: pass --tokenizer DIR "
                "(a local copy of the served model's tokenizer), or use --endpoint chat to let the server apply its template"
            )
        self._template = None
        self.stop_ids: set[int] = set()
        if self.tok is not None:
            from distill_detect.prompts import template_hash

            self._template = template_hash(self.tok, system_prompt)
            self.stop_ids = stop_token_ids(self.tok)
        self._piece_map: dict[str, int] | None = None
        self._piece_lock = threading.Lock()
        self._warned_ids = False
        self.logprobs = bool(logprobs)
        self._n_ok: bool | None = None  # does the server honour n > 1? (None: not asked yet)
        if not self.logprobs:  # text only from the start: no request ever asks for a log-probability
            self.text_only()
            return
        self.echo_ok = False
        if prompt_logprobs and endpoint == "completions":
            self.echo_ok = self._probe_echo()
        self.want_prompt_logprobs = prompt_logprobs and self.echo_ok
        caps = {"output_logprobs", "samples"}
        if self.tok is not None:
            caps.add("output_ids")
        if self.echo_ok:
            caps.add("prompt_logprobs")
        self.capabilities = frozenset(caps)

    def text_only(self) -> None:
        """Ask for no log-probabilities from now on: greedy answers become text-only traces, and only
        the text-only methods can run (the fingerprint says so). ``logprobs=False`` in the constructor
        does this before any request (``ModelSettings.factory`` builds it so for ``--no-logprobs``)."""
        self.logprobs = False
        self.want_prompt_logprobs = False
        self.echo_ok = False
        self.capabilities = frozenset({"samples"})

    # -- setup -------------------------------------------------------------------------------------

    def _resolve_model(self, model: str | None) -> str:
        if model not in (None, "", "default"):
            return model
        try:
            ids = [m.id for m in self._call(lambda: self._client.models.list()).data]
        except ServerError as exc:
            raise ConfigError(
                f"--model not given and {self.base_url}/models could not be listed ({exc}); pass --model NAME"
            ) from None
        if len(ids) != 1:
            raise ConfigError(f"{self.base_url} serves {len(ids)} models ({', '.join(ids[:5])}); choose one with --model NAME")
        return ids[0]

    def _load_tokenizer(self, tokenizer: str | None, model: str | None):
        if tokenizer is None and model not in (None, "", "default"):
            return None  # a served name is not a local path; ask for --tokenizer explicitly
        transformers = require("transformers", "hf", "Rendering the chat template locally (--tokenizer)")
        if tokenizer is None:
            from distill_detect.models import default_model_dir

            tokenizer = str(default_model_dir())
        try:
            return transformers.AutoTokenizer.from_pretrained(tokenizer)
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"--tokenizer {tokenizer!r}: could not load a tokenizer there ({str(exc).splitlines()[0]})"
            ) from None

    def _probe_echo(self) -> bool:
        """Does the server echo the prompt with per-token log-probabilities? One tiny request."""
        try:
            res = self._call(lambda: self._completion("Hello, how are you today?", max_tokens=1, echo=True))
        except ServerError:
            return False
        lp = getattr(res.choices[0], "logprobs", None) if res.choices else None
        tokens = getattr(lp, "tokens", None) or []
        values = getattr(lp, "token_logprobs", None) or []
        return len(tokens) >= 2 and any(v is not None for v in values[:-1])

    def fingerprint(self) -> dict:
        return {
            "backend": self.name,
            "model": {"served": self.model_name},
            "endpoint": self.endpoint,
            "template": self._template,
            "system_prompt": self.system_prompt,
            "decoding": "greedy",
            "extra_body": dict(sorted(self.extra_body.items())),
            "stop_ids": sorted(self.stop_ids),
            **({} if self.logprobs else {"logprobs": False}),
        }

    # -- HTTP with retries -------------------------------------------------------------------------

    def _call(self, fn):
        """Run ``fn`` (one request through the client, which retries transient HTTP failures itself);
        a malformed body is asked for again up to ``max_retries`` times. Errors never show the key."""
        tenacity = self._tenacity
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(_BadBody),
            stop=tenacity.stop_after_attempt(self.max_retries + 1),
            wait=tenacity.wait_random_exponential(multiplier=self.backoff, max=self.max_backoff),
            reraise=True,
        )
        try:
            return retrying(self._call_once, fn)
        except _BadBody as exc:
            raise ServerError(f"{self.base_url} kept failing ({exc}) after {self.max_retries + 1} attempts") from None

    def _call_once(self, fn):
        """One request; the client's exceptions become ServerError/_BadBody with a message for the user."""
        oa = self._openai
        attempts = int(getattr(self._client, "max_retries", self.max_retries)) + 1
        try:
            return fn()
        except (oa.APITimeoutError, oa.APIConnectionError) as exc:  # the client retried these already
            raise ServerError(f"{self.base_url} kept failing ({type(exc).__name__}) after {attempts} attempts") from None
        except oa.APIStatusError as exc:
            code = exc.status_code
            if code in (408, 409, 429) or code >= 500:
                raise ServerError(f"{self.base_url} kept failing (HTTP {code}) after {attempts} attempts") from None
            if code in (401, 403):
                raise ServerError(
                    f"{self.base_url} refused the request (HTTP {code}): set the API key in the environment "
                    f"variable ${self._api_key_env} (or choose another with --api-key-env)"
                ) from None
            raise ServerError(f"{self.base_url} answered HTTP {code}: {_short(exc)}") from None
        except (ValueError, oa.APIResponseValidationError) as exc:  # truncated / malformed JSON body
            raise _BadBody(f"malformed response ({type(exc).__name__})") from None

    def _completion(self, prompt: str, *, max_tokens: int, echo: bool = False, sampling: dict | None = None):
        """Greedy with log-probs, or (``sampling``: temperature, top_p, seed, n) sampled, text only."""
        kw = {"model": self.model_name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "logprobs": 1,
              "echo": echo, "extra_body": self.extra_body or None}  # fmt: skip
        if sampling is not None or not self.logprobs:
            del kw["logprobs"], kw["echo"]
            kw.update(sampling or {})
        return self._client.completions.create(**kw)

    def _chat(self, question: str, *, max_tokens: int, sampling: dict | None = None):
        from distill_detect.prompts import messages_for

        kw = {"model": self.model_name, "messages": messages_for(question, self.system_prompt), "max_tokens": max_tokens,
              "temperature": 0.0, "logprobs": True, "top_logprobs": 1, "extra_body": self.extra_body or None}  # fmt: skip
        if sampling is not None or not self.logprobs:
            del kw["logprobs"], kw["top_logprobs"]
            kw.update(sampling or {})
        return self._client.chat.completions.create(**kw)

    # -- tokens <-> ids ----------------------------------------------------------------------------

    def _pieces(self) -> dict[str, int]:
        """Decoded text of each vocabulary entry -> id, for entries whose text is unique and whole."""
        with self._piece_lock:
            if self._piece_map is None:
                seen: dict[str, int] = {}
                dup: set[str] = set()
                for i in range(len(self.tok)):
                    s = self.tok.decode([i], skip_special_tokens=False)
                    if "\ufffd" in s or not s:
                        continue
                    if s in seen:
                        dup.add(s)
                    seen[s] = i
                self._piece_map = {k: v for k, v in seen.items() if k not in dup}
            return self._piece_map

    def _ids_for(self, pieces: list[str], text: str) -> np.ndarray | None:
        """Token ids for the server's token strings, or None when they cannot be recovered exactly."""
        m = [_TOKEN_ID.match(p) for p in pieces]
        if pieces and all(m):
            return np.asarray([int(x.group(1)) for x in m], np.int32)
        if self.tok is None:
            return None
        table = self._pieces()
        ids = [table.get(p) for p in pieces]
        if all(i is not None for i in ids):
            return np.asarray(ids, np.int32)
        # Pieces that are not whole characters (bytes of one UTF-8 character split over tokens):
        # accept the local tokenisation of the whole text when it has the same pieces where they are known.
        enc = self.tok("".join(pieces), add_special_tokens=False)["input_ids"]
        if len(enc) == len(pieces) and all(i is None or i == e for i, e in zip(ids, enc)):
            return np.asarray(enc, np.int32)
        if not self._warned_ids:
            self._warned_ids = True
            warnings.warn(
                "some generated tokens could not be mapped back to token ids with the local tokenizer; those traces have "
                "no output_ids (TPD and output-likelihood methods still work; tpd_ref does not)",
                stacklevel=3,
            )
        return None

    # -- the interface -----------------------------------------------------------------------------

    def _check_greedy(self, q: Question, lps: list[float], tops: list, pieces: list[str]) -> None:
        if not self.check_greedy:
            return
        for t, (lp, top) in enumerate(zip(lps, tops)):
            if not top:
                continue
            best = max(top.values())
            if lp < best - 1e-3:
                raise DistillDetectError(
                    f"question {q.id!r}, token {t}: the server emitted {pieces[t]!r} (log p {lp:.3f}) although another token "
                    f"was more likely (log p {best:.3f}); its decoding is not greedy on the raw logits. For llama.cpp servers "
                    "turn the repetition penalty off: --extra-body '{\"repeat_penalty\": 1.0}'"
                )

    def _one_text(self, q: Question, max_new_tokens: int) -> Trace:
        """A greedy answer without log-probabilities: a text-only trace."""
        choices, used = self._ask(q, max_new_tokens, None)
        choice = choices[0]
        text = _choice_text(choice)
        return Trace(id=q.id, question=q.text, label=q.label, output_logprobs=None, output_text=text,
                     finish_reason=_finish(choice), max_new_tokens=max_new_tokens,
                     text_tokens=self._count(text, choice, max_new_tokens, used))  # fmt: skip

    def _ask(self, q: Question, max_new_tokens: int, sampling: dict | None) -> tuple[list, int | None]:
        """(choices, generated tokens the server reports for them all or None) of one text-only request
        (greedy when ``sampling`` is None)."""
        if self.endpoint == "completions":
            from distill_detect.prompts import build_prompt

            prompt = build_prompt(self.tok, q.text, self.system_prompt)
            res = self._call(lambda: self._completion(prompt.text, max_tokens=max_new_tokens, sampling=sampling))
        else:
            res = self._call(lambda: self._chat(q.text, max_tokens=max_new_tokens, sampling=sampling))
        _only_choice(res, self.base_url)
        used = getattr(getattr(res, "usage", None), "completion_tokens", None)
        return list(res.choices), (used if isinstance(used, int) and not isinstance(used, bool) else None)

    def _count(self, text: str, choice, max_new_tokens: int, used: int | None = None) -> int:
        """Generated tokens of one answer: ``used``, the server's own count (given for one answer per
        request), else the cap when it stopped there, else the answer re-tokenised locally (0 without a
        tokenizer), never above the cap."""
        if used is not None:
            return int(used)
        if _finish(choice) == "length":
            return int(max_new_tokens)
        n = len(self.tok(text, add_special_tokens=False)["input_ids"]) if self.tok is not None and text else 0
        return min(n, int(max_new_tokens))

    def _sample_group(self, q: Question, ks: list[int], kw: dict, max_new_tokens: int) -> list[Sampled]:
        """Answers ks of one question: with ``n`` in one request where the server honours it, else one request each."""
        common = {"temperature": kw["temperature"], "top_p": kw["top_p"]}
        if len(ks) > 1 and self._n_ok is not False:
            seed = sample_seed(kw["seed"], q.id, ks[0]) % (2**31)
            choices, _ = self._ask(q, max_new_tokens, {**common, "seed": seed, "n": len(ks)})
            texts = [_choice_text(c) for c in choices]
            if len(choices) == len(ks):
                self._n_ok = True
                return [Sampled(t, self._count(t, c, max_new_tokens), _finish(c)) for t, c in zip(texts, choices)]
            self._n_ok = False  # the server ignores n: one request per answer from now on (this group included)
        out = []
        for k in ks:
            choices, used = self._ask(q, max_new_tokens, {**common, "seed": sample_seed(kw["seed"], q.id, k) % (2**31)})
            c = choices[0]
            t = _choice_text(c)
            out.append(Sampled(t, self._count(t, c, max_new_tokens, used), _finish(c)))
        return out

    def sample(self, requests, *, temperature: float, top_p: float, seed: int, max_new_tokens: int) -> list[Sampled]:
        groups: list[tuple[Question, list[int], list[int]]] = []  # (question, ks, positions in requests)
        for pos, (q, k) in enumerate(requests):
            if groups and groups[-1][0].id == q.id and groups[-1][1][-1] == k - 1:
                groups[-1][1].append(k)
                groups[-1][2].append(pos)
            else:
                groups.append((q, [k], [pos]))
        kw = {"temperature": temperature, "top_p": top_p, "seed": seed}

        def run(g):
            return self._sample_group(g[0], g[1], kw, max_new_tokens)

        if len(groups) <= 1 or self.concurrency == 1:
            results = [run(g) for g in groups]
        else:
            with ThreadPoolExecutor(max_workers=min(self.concurrency, len(groups))) as pool:
                results = list(pool.map(run, groups))
        out: list = [None] * len(requests)
        for (_, _, positions), res in zip(groups, results):
            for pos, r in zip(positions, res):
                out[pos] = r
        return out

    def _one(self, q: Question, max_new_tokens: int) -> Trace:
        if not self.logprobs:
            return self._one_text(q, max_new_tokens)
        prompt_fields: dict = {}
        if self.endpoint == "completions":
            from distill_detect.prompts import build_prompt

            prompt = build_prompt(self.tok, q.text, self.system_prompt)
            echo = self.want_prompt_logprobs
            res = self._call(lambda: self._completion(prompt.text, max_tokens=max_new_tokens, echo=echo))
            choice = _only_choice(res, self.base_url)
            lp = choice.logprobs
            pieces = list(getattr(lp, "tokens", None) or [])
            values = list(getattr(lp, "token_logprobs", None) or [])
            tops = list(getattr(lp, "top_logprobs", None) or [None] * len(values))
            text = choice.text or ""
            if echo:
                n_prompt = _prompt_token_count(pieces, getattr(lp, "text_offset", None), prompt.text, text)
                prompt_fields = self._prompt_fields(q, prompt, pieces[:n_prompt], values[:n_prompt])
                pieces, values, tops = pieces[n_prompt:], values[n_prompt:], tops[n_prompt:]
                text = text[len(prompt.text) :] if text.startswith(prompt.text) else text
        else:
            res = self._call(lambda: self._chat(q.text, max_tokens=max_new_tokens))
            choice = _only_choice(res, self.base_url)
            content = getattr(getattr(choice, "logprobs", None), "content", None) or []
            pieces = [c.token for c in content]
            values = [c.logprob for c in content]
            tops = [{t.token: t.logprob for t in (c.top_logprobs or [])} for c in content]
            text = getattr(choice.message, "content", None) or ""
            if content and all(getattr(c, "bytes", None) for c in content):
                pieces = [
                    bytes(c.bytes).decode("utf-8", errors="replace") if _TOKEN_ID.match(c.token) is None else c.token
                    for c in content
                ]
        if (not values and text) or any(v is None for v in values):
            raise NoLogprobsError(
                f"{self.base_url} returned no per-token log-probabilities for question {q.id!r} on /v1/{_path(self.endpoint)}; "
                "the server must support 'logprobs' (llama-cpp-python: start it with --logits_all true; vLLM supports it), "
                "or pass --no-logprobs to audit it with the text-only methods (--methods cdd,answer_agree --samples 8)"
            )
        lps = [float(v) for v in values]
        self._check_greedy(q, lps, tops, pieces)
        finish = choice.finish_reason or "length"
        finish = "stop" if finish in ("stop", "eos", "end_turn") else ("length" if finish == "length" else finish)
        ids = self._ids_for(pieces, text) if pieces else np.zeros(0, np.int32)
        return Trace(
            id=q.id,
            question=q.text,
            label=q.label,
            output_ids=ids,
            output_logprobs=np.asarray(lps, np.float32),
            output_text=text,
            finish_reason=finish,
            max_new_tokens=max_new_tokens,
            **prompt_fields,
        )

    def _prompt_fields(self, q: Question, prompt, pieces: list[str], values: list) -> dict:
        """Question-token log-probs from an echoed prompt, aligned to the local tokenisation."""
        s, e = prompt.question_span
        if e <= s:
            return {"prompt_ids": np.zeros(0, np.int32), "prompt_logprobs": np.zeros(0, np.float32)}
        target = [self.tok.decode([i], skip_special_tokens=False) for i in prompt.ids[s:e]]
        # Servers do not echo every prompt token alike (llama-cpp-python drops the first token and every BOS,
        # and renders other special tokens as ''), so locate the question's own tokens: the last place where
        # the echoed pieces spell them token by token.
        n = len(target)
        for k in range(len(pieces) - n, -1, -1):
            if pieces[k : k + n] == target:
                vals = values[k : k + n]
                if all(v is not None for v in vals):
                    return {
                        "prompt_ids": np.asarray(prompt.ids[s:e], np.int32),
                        "prompt_logprobs": np.asarray([float(v) for v in vals], np.float32),
                    }
                break
        raise DistillDetectError(
            f"question {q.id!r}: the server tokenised the prompt differently from the local tokenizer, so the question's "
            "tokens cannot be located; pass --tokenizer with the served model's own tokenizer, or --no-prompt-logprobs"
        )

    def generate(self, questions: Sequence[Question], *, max_new_tokens: int) -> list[Trace]:
        if len(questions) <= 1 or self.concurrency == 1:
            return [self._one(q, max_new_tokens) for q in questions]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(questions))) as pool:
            return list(pool.map(lambda q: self._one(q, max_new_tokens), questions))

    def score_prompts(self, questions: Sequence[Question]) -> list[dict]:
        if not self.echo_ok:
            return super().score_prompts(questions)
        from distill_detect.prompts import build_prompt

        out = []
        for q in questions:
            prompt = build_prompt(self.tok, q.text, self.system_prompt)
            res = self._call(lambda p=prompt: self._completion(p.text, max_tokens=1, echo=True))
            lp = _only_choice(res, self.base_url).logprobs
            pieces = list(lp.tokens or [])
            n = _prompt_token_count(pieces, getattr(lp, "text_offset", None), prompt.text, res.choices[0].text or "")
            out.append(self._prompt_fields(q, prompt, pieces[:n], list(lp.token_logprobs or [])[:n]))
        return out

    def close(self) -> None:
        self._client.close()


def _choice_text(choice) -> str:
    """The text of a completion or chat choice."""
    msg = getattr(choice, "message", None)
    if msg is not None:
        return getattr(msg, "content", None) or ""
    return getattr(choice, "text", None) or ""


def _finish(choice) -> str:
    f = getattr(choice, "finish_reason", None) or "length"
    return "stop" if f in ("stop", "eos", "end_turn") else ("length" if f == "length" else f)


def _path(endpoint: str) -> str:
    return "completions" if endpoint == "completions" else "chat/completions"


def _short(exc) -> str:
    msg = str(getattr(exc, "message", "") or exc)
    return msg.splitlines()[0][:200] if msg else type(exc).__name__


def _only_choice(res, url: str):
    choices = getattr(res, "choices", None)
    if not choices:
        raise ServerError(f"{url} returned a response without choices")
    return choices[0]


def _prompt_token_count(pieces: list[str], offsets, prompt_text: str, echoed_text: str) -> int:
    """How many leading echoed tokens belong to the prompt.

    The generated part of the echoed text is matched by the last pieces (exact when the
    pieces are whole characters); otherwise the character offsets decide, else the piece
    lengths counted from the start.

    >>> _prompt_token_count(["Hi", " there", " you"], None, "Hi there", "Hi there you")
    2
    """
    if echoed_text.startswith(prompt_text):
        gen = echoed_text[len(prompt_text) :]
        acc, k = "", 0
        while k < len(pieces) and len(acc) < len(gen):
            acc = pieces[len(pieces) - 1 - k] + acc
            k += 1
        if acc == gen:
            return len(pieces) - k
    n_chars = len(prompt_text)
    if offsets and len(offsets) == len(pieces):
        for i, off in enumerate(offsets):
            if off - offsets[0] >= n_chars:
                return i
        return len(pieces)
    total = 0
    for i, p in enumerate(pieces):
        if total >= n_chars:
            return i
        total += len(p)
    return len(pieces)
