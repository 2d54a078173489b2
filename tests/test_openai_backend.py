"""The OpenAI-compatible backend, against servers on 127.0.0.1 only.

* A tiny fake server (``http.server``) that answers in the OpenAI formats and fails on
  purpose the first times (429, 500, a truncated JSON body): retries, errors, parsing.
* A real llama-cpp-python server (``python -m llama_cpp.server``) serving the embedded
  SmolLM2 GGUF: tokens and log-probs against the HF and llama.cpp backends, and a server
  killed mid-run loses no finished question. Skipped with the reason when
  ``llama_cpp.server`` is not importable (``scripts/ci_server.sh`` installs it).

Every request loop here is bounded (few retries, short backoff, timeouts).
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openai", reason="the openai backend needs the 'openai' package: pip install 'distill-detect[openai]'")

from distill_detect.backends.openai import NoLogprobsError, OpenAIBackend, ServerError  # noqa: E402
from distill_detect.errors import ConfigError, DistillDetectError  # noqa: E402
from distill_detect.types import Question  # noqa: E402

# -- a fake OpenAI-compatible server ---------------------------------------------------------------

PIECES = ["The", " answer", " is", " ", "4", "."]
LOGPROBS = [-0.01, -0.2, -0.05, -0.9, -1.5, -0.3]


class FakeState:
    def __init__(self):
        self.failures: list = []  # consumed in order: int status, or "truncated"
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.no_logprobs = False
        self.not_greedy = False
        self.echo = True
        self.tok = None  # set: echo the prompt in this tokenizer's tokens (else one token per character)
        self.drop_first = False  # llama-cpp-python style: the first prompt token is not echoed
        self.lock = threading.Lock()


def _completion_body(state: FakeState, req: dict) -> dict:
    pieces, lps = list(PIECES), list(LOGPROBS)
    tops = [{p: lp} for p, lp in zip(pieces, lps)]
    if state.not_greedy:
        tops[2] = {" was": -0.01}
    if req.get("echo") and state.echo:
        prompt = req["prompt"]
        # Echo the prompt (first token without a log-prob, as servers do); prompt token j gets log p = -0.01 * j.
        if state.tok is not None:
            pp = [state.tok.decode([i]) for i in state.tok(prompt, add_special_tokens=False)["input_ids"]]
        else:
            pp = list(prompt)
        plp = [None] + [-0.01 * j for j in range(1, len(pp))]
        if state.drop_first:
            pp, plp = pp[1:], plp[1:]
        pieces = pp + pieces
        lps = plp + lps
        tops = [None if v is None else {c: v} for c, v in zip(pp, plp)] + tops
        text = prompt + "".join(PIECES)
    else:
        text = "".join(pieces)
    n = min(len(PIECES), int(req.get("max_tokens") or 16))
    cut = len(pieces) - len(PIECES) + n
    pieces, lps, tops = pieces[:cut], lps[:cut], tops[:cut]
    text = text[: len(text) - sum(len(p) for p in PIECES[n:])]
    offsets, pos = [], 0
    for p in pieces:
        offsets.append(pos)
        pos += len(p)
    logprobs = (
        None if state.no_logprobs else {"tokens": pieces, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}
    )
    return {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 0,
        "model": "fake-model",
        "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": "stop" if n == len(PIECES) else "length"}],
    }


def _chat_body(state: FakeState, req: dict) -> dict:
    content = [
        {
            "token": p,
            "logprob": lp,
            "bytes": list(p.encode()),
            "top_logprobs": [{"token": p, "logprob": lp, "bytes": list(p.encode())}],
        }
        for p, lp in zip(PIECES, LOGPROBS)
    ]
    return {
        "id": "chat-1",
        "object": "chat.completion",
        "created": 0,
        "model": "fake-model",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "".join(PIECES)},
                "logprobs": None if state.no_logprobs else {"content": content},
                "finish_reason": "stop",
            }
        ],
    }


def make_handler(state: FakeState):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):  # quiet
            pass

        def _send(self, code: int, body: bytes, length: int | None = None):
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body) if length is None else length))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path.endswith("/models"):
                self._send(
                    200,
                    json.dumps(
                        {"object": "list", "data": [{"id": "fake-model", "object": "model", "created": 0, "owned_by": "me"}]}
                    ).encode(),
                )
            else:
                self._send(404, b"{}")

        def do_POST(self):
            n = int(self.headers.get("Content-Length", 0))
            req = json.loads(self.rfile.read(n))
            with state.lock:
                state.requests.append(req)
                state.headers.append({k.lower(): v for k, v in self.headers.items()})
                fail = state.failures.pop(0) if state.failures else None
            if fail == "truncated":
                body = json.dumps(_completion_body(state, req)).encode()
                half = body[: len(body) // 2]
                self._send(200, half)  # a complete HTTP message whose JSON is cut short
                return
            if isinstance(fail, int):
                self._send(fail, json.dumps({"error": {"message": f"injected {fail}", "type": "x"}}).encode())
                return
            body = _chat_body(state, req) if self.path.endswith("/chat/completions") else _completion_body(state, req)
            self._send(200, json.dumps(body).encode())

    return Handler


@pytest.fixture()
def fake():
    state = FakeState()
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield state
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def tok_dir(default_dir):
    return str(default_dir)


def _backend(fake, tok_dir, **kw):
    kw.setdefault("backoff", 0.01)
    kw.setdefault("max_retries", 3)
    kw.setdefault("timeout", 10)
    return OpenAIBackend("fake-model", base_url=fake.url, tokenizer=tok_dir, **kw)


# -- fake-server tests ------------------------------------------------------------------------------


def test_completions_greedy_request_and_parsing(fake, tok_dir):
    be = _backend(fake, tok_dir, prompt_logprobs=False)
    [t] = be.generate([Question(id="a", text="What is 2+2?")], max_new_tokens=50)
    req = fake.requests[-1]
    assert req["temperature"] == 0 and req["logprobs"] == 1 and req["max_tokens"] == 50 and req["model"] == "fake-model"
    assert "<|im_start|>user\nWhat is 2+2?<|im_end|>" in req["prompt"]  # rendered with the local chat template
    np.testing.assert_allclose(t.output_logprobs, LOGPROBS, rtol=0, atol=1e-7)
    assert t.output_text == "The answer is 4." and t.finish_reason == "stop" and t.max_new_tokens == 50
    # Every piece is one SmolLM2 vocabulary entry, so ids are recovered and decode back to the text.
    assert be.tok.decode(t.output_ids.tolist()) == "The answer is 4."
    assert "prompt_logprobs" not in be.capabilities and "output_ids" in be.capabilities


def test_length_finish_and_batch_order(fake, tok_dir):
    be = _backend(fake, tok_dir, prompt_logprobs=False, concurrency=3)
    qs = [Question(id=f"q{i}", text=f"question {i}") for i in range(5)]
    traces = be.generate(qs, max_new_tokens=2)
    assert [t.id for t in traces] == [q.id for q in qs]
    assert all(t.finish_reason == "length" and t.num_tokens == 2 for t in traces)


def test_echo_gives_question_logprobs(fake, tok_dir):
    be = _backend(fake, tok_dir)  # probes echo at start-up
    assert be.echo_ok and "prompt_logprobs" in be.capabilities
    # The fake echoes one token per character, which is not the local tokenisation: located nowhere -> clear error.
    with pytest.raises(DistillDetectError, match="tokenised the prompt differently"):
        be.generate([Question(id="a", text="What is 2+2?")], max_new_tokens=8)


@pytest.mark.parametrize("drop_first", [False, True])
def test_echo_prompt_logprobs_aligned_to_local_tokens(fake, tok_dir, drop_first):
    from distill_detect.prompts import build_prompt

    be = _backend(fake, tok_dir)
    fake.tok, fake.drop_first = be.tok, drop_first
    q = Question(id="a", text="What is 2+2, exactly?")
    [t] = be.generate([q], max_new_tokens=8)
    p = build_prompt(be.tok, q.text)
    s, e = p.question_span
    assert t.prompt_ids.tolist() == p.ids[s:e]
    np.testing.assert_allclose(t.prompt_logprobs, [-0.01 * j for j in range(s, e)], atol=1e-6)
    np.testing.assert_allclose(t.output_logprobs, LOGPROBS, atol=1e-7)  # generated part split off correctly
    assert t.output_text == "".join(PIECES)
    [f] = be.score_prompts([q])
    np.testing.assert_allclose(f["prompt_logprobs"], t.prompt_logprobs)


def test_no_echo_server_means_no_prompt_capability(fake, tok_dir):
    fake.echo = False
    be = _backend(fake, tok_dir)
    assert not be.echo_ok and "prompt_logprobs" not in be.capabilities
    with pytest.raises(NotImplementedError):
        be.score_prompts([Question(id="a", text="x")])


def test_chat_endpoint(fake, tok_dir):
    be = _backend(fake, tok_dir, endpoint="chat")
    [t] = be.generate([Question(id="a", text="What is 2+2?")], max_new_tokens=8)
    req = fake.requests[-1]
    assert req["messages"] == [{"role": "user", "content": "What is 2+2?"}]
    assert req["logprobs"] is True and req["top_logprobs"] == 1 and req["temperature"] == 0
    np.testing.assert_allclose(t.output_logprobs, LOGPROBS, atol=1e-7)
    assert t.output_ids is not None and len(t.output_ids) == len(PIECES)


def test_retries_on_429_500_and_truncated_body(fake, tok_dir):
    be = _backend(fake, tok_dir, prompt_logprobs=False, max_retries=4)
    fake.failures = [429, 500, "truncated", 503]
    [t] = be.generate([Question(id="a", text="q")], max_new_tokens=8)
    assert t.num_tokens == len(PIECES)
    assert len(fake.requests) == 5  # four failures, then success


def test_gives_up_after_max_retries(fake, tok_dir):
    be = _backend(fake, tok_dir, prompt_logprobs=False, max_retries=2)
    fake.failures = [500] * 10
    with pytest.raises(ServerError, match=r"127\.0\.0\.1:\d+/v1 kept failing \(HTTP 500\) after 3 attempts"):
        be.generate([Question(id="a", text="q")], max_new_tokens=8)
    assert len(fake.requests) == 3


def test_malformed_bodies_are_retried_then_given_up_on(fake, tok_dir):
    """The client retries HTTP failures itself but not a 200 with a cut JSON body: that retry is ours."""
    be = _backend(fake, tok_dir, prompt_logprobs=False, max_retries=2)
    fake.failures = ["truncated", "truncated"]
    [t] = be.generate([Question(id="a", text="q")], max_new_tokens=8)
    assert t.num_tokens == len(PIECES) and len(fake.requests) == 3
    fake.requests.clear()
    fake.failures = ["truncated"] * 5
    with pytest.raises(ServerError, match=r"127\.0\.0\.1:\d+/v1 kept failing \(malformed response .*\) after 3 attempts"):
        be.generate([Question(id="a", text="q")], max_new_tokens=8)
    assert len(fake.requests) == 3


def test_client_errors_are_not_retried(fake, tok_dir):
    be = _backend(fake, tok_dir, prompt_logprobs=False)
    fake.failures = [400]
    with pytest.raises(ServerError, match="HTTP 400"):
        be.generate([Question(id="a", text="q")], max_new_tokens=8)
    assert len(fake.requests) == 1


def test_api_key_from_env_only_and_never_shown(fake, tok_dir, monkeypatch):
    secret = "sk-test-SECRET-123456"
    monkeypatch.setenv("MY_KEY", secret)
    be = _backend(fake, tok_dir, prompt_logprobs=False, api_key_env="MY_KEY")
    be.generate([Question(id="a", text="q")], max_new_tokens=8)
    assert fake.headers[-1].get("authorization") == f"Bearer {secret}"
    assert secret not in json.dumps(be.fingerprint()) and secret not in repr(vars(be))
    fake.failures = [401]
    with pytest.raises(ServerError) as err:
        be.generate([Question(id="a", text="q")], max_new_tokens=8)
    assert "$MY_KEY" in str(err.value) and secret not in str(err.value)


def test_missing_logprobs_is_a_clear_error(fake, tok_dir):
    fake.no_logprobs = True
    be = _backend(fake, tok_dir, prompt_logprobs=False)
    with pytest.raises(NoLogprobsError, match="no per-token log-probabilities"):
        be.generate([Question(id="a", text="q")], max_new_tokens=8)


def test_non_greedy_server_is_refused(fake, tok_dir):
    fake.not_greedy = True
    be = _backend(fake, tok_dir, prompt_logprobs=False)
    with pytest.raises(DistillDetectError, match="repeat_penalty"):
        be.generate([Question(id="a", text="q")], max_new_tokens=8)


def test_model_discovery_and_option_errors(fake, tok_dir):
    be = OpenAIBackend("default", base_url=fake.url, tokenizer=tok_dir, prompt_logprobs=False, backoff=0.01)
    assert be.model_name == "fake-model"
    with pytest.raises(ConfigError, match="--base-url"):
        OpenAIBackend("m", tokenizer=tok_dir)
    with pytest.raises(ConfigError, match="--tokenizer"):
        OpenAIBackend("m", base_url=fake.url, prompt_logprobs=False)
    with pytest.raises(ConfigError, match="api-key-env"):
        OpenAIBackend("m", base_url=fake.url, api_key_env="sk-abc-not-a-name", tokenizer=tok_dir)


# -- CLI: capability table, refusal before model time, generate through the server ---------------------


def test_backends_table(capsys):
    from distill_detect import cli

    assert cli.main(["backends"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line and not line.startswith(("[", "'"))}
    header = rows.pop("method")
    col = {name: i for i, name in enumerate(header)}
    cell = lambda m, b: rows[m][col[b]]  # noqa: E731
    assert cell("tpd", "openai") == "yes" and cell("out_entropy", "openai") == "no" and cell("min_k_pp", "openai") == "no"
    assert cell("loss", "openai").startswith("if") and cell("tpd_ref", "openai").startswith("if")
    assert cell("loss", "vllm") == "yes" and cell("out_entropy", "vllm") == "no" and cell("out_entropy", "hf") == "yes"
    assert "echo" in out  # the condition for prompt log-probs is spelled out


def _qfile(tmp_path, name="q", start=0):
    f = tmp_path / f"{name}.jsonl"
    f.write_text("".join(json.dumps({"id": f"c{i}", "question": f"What is {i}+{i}?"}) + "\n" for i in range(start, start + 3)))
    return f


def test_cli_refuses_impossible_methods_before_any_request(fake, tok_dir, tmp_path, capsys):
    from distill_detect import cli

    m, n = _qfile(tmp_path, "m"), _qfile(tmp_path, "n", 3)
    base = ["run", "--members", str(m), "--nonmembers", str(n), "--out", str(tmp_path / "o"), "--backend", "openai"]
    base += ["--base-url", fake.url, "--model", "fake-model", "--tokenizer", tok_dir]
    assert cli.main(base + ["--methods", "tpd,out_entropy"]) == 2
    assert "out_entropy" in capsys.readouterr().err and fake.requests == []  # refused by class: no request at all
    fake.echo = False
    assert cli.main(base + ["--methods", "tpd,loss"]) == 2
    err = capsys.readouterr().err
    assert "'loss'" in err and "question tokens" in err
    assert all(r.get("echo") for r in fake.requests)  # only the start-up probe reached the server


def test_cli_generate_through_openai(fake, tok_dir, tmp_path):
    from distill_detect import cli
    from distill_detect.store import TraceStore

    args = ["generate", "--questions", str(_qfile(tmp_path)), "--out", str(tmp_path / "run"), "--backend", "openai"]
    args += ["--base-url", fake.url, "--model", "fake-model", "--tokenizer", tok_dir, "--no-prompt-logprobs"]
    args += ["--concurrency", "2", "--extra-body", '{"repeat_penalty": 1.0}', "--max-new-tokens", "32"]
    assert cli.main(args) == 0
    assert fake.requests[-1]["repeat_penalty"] == 1.0
    with TraceStore(tmp_path / "run") as st:
        traces = list(st.traces())
        fp = st.get_meta("fingerprint")
    assert len(traces) == 3 and all(t.num_tokens == len(PIECES) for t in traces)
    assert fp["backend"] == "openai" and fp["extra_body"] == {"repeat_penalty": 1.0} and "127.0.0.1" not in json.dumps(fp)


# -- a real llama-cpp-python server -----------------------------------------------------------------


# ``llama_cpp.server``'s __init__ is empty, so finding it says nothing about the server's own
# dependencies; check each module the server imports when it starts.
SERVER_MODULES = ("llama_cpp", "uvicorn", "fastapi", "sse_starlette", "starlette_context", "pydantic_settings")


def _have_server() -> bool:
    try:
        return all(importlib.util.find_spec(name) is not None for name in SERVER_MODULES) and (
            importlib.util.find_spec("llama_cpp.server.app") is not None
        )
    except ImportError:
        return False


HAVE_SERVER = _have_server()
if not HAVE_SERVER and os.environ.get("DISTILL_DETECT_REQUIRE_SERVER") == "1":
    raise RuntimeError(
        "DISTILL_DETECT_REQUIRE_SERVER=1 but the llama-cpp-python server cannot be imported "
        f"(needs {', '.join(SERVER_MODULES)}; run scripts/ci_server.sh)"
    )
needs_server = pytest.mark.skipif(
    not HAVE_SERVER,
    reason="llama_cpp.server is not importable; install it with scripts/ci_server.sh (pip install 'llama-cpp-python[server]')",
)

QUESTIONS = ["What is 7 times 8?", "Name the capital of France.", "List three colours.", "What is the square root of 81?"]
MAX_NEW = 12  # llama-cpp-python sorts the whole vocabulary in Python for every log-prob: keep requests short
EXTRA = {"repeat_penalty": 1.0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int) -> subprocess.Popen:
    """Start llama-cpp-python's server on 127.0.0.1:port; its log goes to a file (a full pipe would block it)."""
    import tempfile

    from distill_detect.models import find_default_gguf

    cmd = [
        sys.executable, "-m", "llama_cpp.server",
        "--model", str(find_default_gguf()), "--model_alias", "smollm2",
        "--host", "127.0.0.1", "--port", str(port),
        "--n_ctx", "1024", "--n_threads", "1", "--logits_all", "true", "--verbose", "false",
    ]  # fmt: skip
    log = tempfile.NamedTemporaryFile(prefix="llama_server_", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    proc.log_path = log.name
    deadline = time.time() + 90
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"llama_cpp.server exited: {Path(log.name).read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"llama_cpp.server did not start within 90 s: {Path(log.name).read_text()[-2000:]}")


@pytest.fixture(scope="module")
def server():
    port = _free_port()
    proc = start_server(port)
    yield {"proc": proc, "port": port, "url": f"http://127.0.0.1:{port}/v1"}
    proc.kill()
    proc.wait(10)


def _server_backend(url, tok_dir, **kw):
    return OpenAIBackend(
        "smollm2", base_url=url, tokenizer=tok_dir, extra_body=EXTRA, backoff=0.05, max_retries=2, timeout=60, **kw
    )


@needs_server
def test_real_server_matches_hf_and_llamacpp(server, tok_dir, default_dir):
    """Same prompt, same model (Q4_1 GGUF on llama.cpp vs its float32 dequantisation on torch).

    Measured here: identical greedy tokens on a common prefix and a bounded log-prob gap;
    the numbers are printed (pytest -s) for the README's tolerance table.
    """
    from distill_detect.backends.hf import HFBackend

    be = _server_backend(server["url"], tok_dir)
    qs = [Question(id=f"q{i}", text=t) for i, t in enumerate(QUESTIONS[:3])]
    api = be.generate(qs, max_new_tokens=MAX_NEW)
    hf = HFBackend(str(default_dir), dtype="float32", device="cpu", prompt_logprobs=be.echo_ok).generate(
        qs, max_new_tokens=MAX_NEW
    )
    prefix, gaps = [], []
    for a, h in zip(api, hf):
        assert a.output_ids is not None, "pieces should map back to ids with the model's own tokenizer"
        n = min(len(a.output_ids), len(h.output_ids))
        same = int(np.argmin(np.r_[a.output_ids[:n] == h.output_ids[:n], False]))
        prefix.append(same / max(n, 1))
        assert same >= min(n, 4), f"{a.id}: API and HF differ already at token {same}"
        gaps.append(float(np.max(np.abs(a.output_logprobs[:same] - h.output_logprobs[:same]))))
        if be.echo_ok and a.prompt_logprobs is not None:
            np.testing.assert_array_equal(a.prompt_ids, h.prompt_ids)
            assert np.max(np.abs(a.prompt_logprobs - h.prompt_logprobs)) < 0.5
    print(f"\nAPI vs HF: common-prefix fraction {np.round(prefix, 2).tolist()}, max |dlogprob| {max(gaps):.4f}")
    assert max(gaps) < 0.5  # Q4_1 vs its dequantised float32: same weights, different kernels
    try:
        from distill_detect.backends.llamacpp import LlamaCppBackend
    except ImportError:
        return  # no in-process llama.cpp backend in this checkout
    lc_backend = LlamaCppBackend(n_threads=1)  # the embedded GGUF, the same file the server serves
    lc = lc_backend.generate(qs, max_new_tokens=MAX_NEW)
    lc_gaps = []
    for a, c in zip(api, lc):
        n = min(len(a.output_ids), len(c.output_ids))
        np.testing.assert_array_equal(a.output_ids[:n], c.output_ids[:n])
        lc_gaps.append(float(np.max(np.abs(a.output_logprobs[:n] - c.output_logprobs[:n]), initial=0)))
    print(f"API vs in-process llama.cpp: same tokens, max |dlogprob| {max(lc_gaps):.4f}")
    # Same GGUF and library, but the server decodes one sequence with logits for every position while the
    # in-process backend batches sequences: llama.cpp's quantised kernels round differently (measured ~0.15).
    assert max(lc_gaps) < 0.5


@needs_server
def test_real_server_kill_loses_no_finished_question(tmp_path, tok_dir):
    """Generate with batch size 1, kill the server after some traces are stored, rerun after a restart."""
    from distill_detect.pipeline import generate_run
    from distill_detect.store import TraceStore

    port = _free_port()
    url = f"http://127.0.0.1:{port}/v1"
    proc = start_server(port)
    run = tmp_path / "run"
    qs = [Question(id=f"k{i}", text=t) for i, t in enumerate(QUESTIONS)]
    stored_at_kill = []

    class KillAfterTwo:
        """Wraps the backend: kills the server once two traces are stored."""

        def __init__(self):
            self.inner = _server_backend(url, tok_dir, prompt_logprobs=False)
            self.name, self.location = self.inner.name, None
            self.calls = 0

        def fingerprint(self):
            return self.inner.fingerprint()

        def generate(self, batch, *, max_new_tokens):
            if self.calls == 2:
                with TraceStore(run) as st:
                    stored_at_kill.append(st.counts()["traces"])
                proc.kill()
                proc.wait(10)
            self.calls += 1
            return self.inner.generate(batch, max_new_tokens=max_new_tokens)

    try:
        with pytest.raises(ServerError, match="kept failing"):
            generate_run(qs, run, KillAfterTwo, max_new_tokens=8, batch_size=1)
        assert stored_at_kill == [2]
        with TraceStore(run) as st:
            assert st.counts()["traces"] == 2
            first = {t.id: t for t in st.traces()}
        proc = start_server(port)
        s = generate_run(qs, run, lambda: _server_backend(url, tok_dir, prompt_logprobs=False), max_new_tokens=8, batch_size=1)
        assert s["already_done"] == 2 and s["generated"] == len(qs) - 2
        with TraceStore(run) as st:
            traces = list(st.traces())
            assert st.integrity_check() == []
        assert sorted(t.id for t in traces) == sorted(q.id for q in qs)  # every question exactly once
        for t in traces:
            if t.id in first:
                np.testing.assert_array_equal(t.output_logprobs, first[t.id].output_logprobs)
    finally:
        proc.kill()
        proc.wait(10)


@needs_server
def test_real_server_text_only_generate_then_score_without_a_model(server, tok_dir, tmp_path, monkeypatch):
    """--no-logprobs --samples 4 against llama.cpp's server, then the text-only methods from the stored answers
    with no model and no server: what a black-box audit of a text-only API does (docs/black-box.md)."""
    pytest.importorskip("rapidfuzz", reason="the text-only methods need rapidfuzz: pip install 'distill-detect[text]'")
    import contextlib
    import io
    import warnings

    import distill_detect.backends as B
    from distill_detect.cli import main
    from distill_detect.store import TraceStore

    answers = [56, "Paris", "red", 9]  # numbers as numbers: read as text
    qfile = tmp_path / "q.jsonl"
    qfile.write_text(
        "".join(
            json.dumps({"id": f"t{i}", "question": t, "answer": a}) + "\n" for i, (t, a) in enumerate(zip(QUESTIONS, answers))
        )
    )

    def cli(argv):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rc = main(argv)
        return rc, out.getvalue() + err.getvalue(), [str(w.message) for w in caught]

    gen = ["generate", "--questions", str(qfile), "--backend", "openai", "--base-url", server["url"], "--model", "smollm2",
           "--tokenizer", tok_dir, "--extra-body", json.dumps(EXTRA), "--no-logprobs", "--max-new-tokens", str(MAX_NEW)]  # fmt: skip
    rc, said, _ = cli([*gen, "--out", str(tmp_path / "run"), "--samples", "4", "--sample-seed", "11"])
    assert rc == 0, said
    assert "16 sampled answers generated now" in said
    with TraceStore(tmp_path / "run") as st:
        fp, sampling = st.get_meta("fingerprint"), st.get_meta("sampling")
        traces = list(st.traces(sampling=sampling))
    assert fp["logprobs"] is False and fp["backend"] == "openai" and sampling["n"] == 4 and sampling["seed"] == 11
    assert [t.id for t in traces] == ["t0", "t1", "t2", "t3"] and [t.solution for t in traces] == ["56", "Paris", "red", "9"]
    assert all(t.output_logprobs is None and t.output_text and t.samples.n == 4 for t in traces)
    assert all(all(s.strip() for s in t.samples.texts) and 0 < max(t.samples.num_tokens) <= MAX_NEW for t in traces)

    # The text-only greedy answer is the server's greedy answer (the same one it gives with log-probabilities).
    with_lp = _server_backend(server["url"], tok_dir, prompt_logprobs=False).generate(
        [Question("t1", QUESTIONS[1])], max_new_tokens=MAX_NEW
    )[0]
    assert with_lp.output_text == traces[1].output_text

    # Seeded: answer k depends on (seed, question, k) only, so N = 2 in another run is the first two of N = 4.
    rc, said, _ = cli([*gen, "--out", str(tmp_path / "run2"), "--samples", "2", "--sample-seed", "11"])
    assert rc == 0, said
    with TraceStore(tmp_path / "run2") as st:
        two = {t.id: t for t in st.traces(sampling=st.get_meta("sampling"))}
    for t in traces:
        assert two[t.id].output_text == t.output_text and two[t.id].samples.texts == t.samples.texts[:2]

    # Scoring reads the stored answers: no model, no server, no warning about tokens or TPD.
    monkeypatch.setattr(B, "make_backend", lambda *a, **k: pytest.fail("score must not load a model"))
    rc, said, caught = cli(
        ["score", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "scored"), "--methods", "cdd,answer_agree"]
    )
    assert rc == 0, said
    assert not [w for w in caught if "token" in w or "TPD" in w], caught
    rows = [json.loads(x) for x in (tmp_path / "scored" / "scores.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["t0", "t1", "t2", "t3"]
    assert all(0.0 <= r["cdd"] <= 1.0 and 0.0 <= r["answer_agree"] <= 1.0 for r in rows)
    assert set(rows[0]) == {"id", "cdd", "answer_agree"}
    rc, said, _ = cli(["score", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "tpd"), "--methods", "tpd"])
    assert rc == 2 and "output_logprobs" in said  # a text-only run cannot feed a log-probability method
