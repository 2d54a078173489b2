"""Security: no pickle, no remote code unless asked, API keys never written, input never chooses where files go.

Report text escaping is tested in tests/test_report.py (``test_embed_json_cannot_close_the_script_block``,
``test_report_html_keeps_hostile_text_inside_the_json``, ``test_script_never_parses_data_as_html``) and
in a browser in tests/test_report_browser.py (``test_hostile_questions_show_as_text_and_run_nothing``).
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import secrets
import shutil
import threading
import uuid
from http.server import ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from stand_ins import JSONHandler

import distill_detect
from distill_detect import backends, cli
from distill_detect.store import TraceStore
from distill_detect.types import Trace

PACKAGE = Path(distill_detect.__file__).parent

# -- no pickle ------------------------------------------------------------------------------------------------

_PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _is_true(kw: dict, arg: str) -> bool:
    return arg in kw and isinstance(kw[arg], ast.Constant) and kw[arg].value is True


def pickle_uses(source: str, name: str = "<src>") -> list[str]:
    """Code (not comments or docstrings) that could unpickle or load code: imports, calls, flags."""
    found = []
    for node in ast.walk(ast.parse(source)):
        where = f"{name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in _PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in _PICKLE_MODULES:
            found.append(f"{where}: from {node.module} import ...")
        elif isinstance(node, ast.Name | ast.Attribute):
            ident = node.id if isinstance(node, ast.Name) else node.attr
            if ident in _PICKLE_MODULES:
                found.append(f"{where}: uses {ident}")
        if isinstance(node, ast.Call):
            func = ast.unparse(node.func)
            kw = {k.arg: k.value for k in node.keywords}

            if func == "torch.load" and not _is_true(kw, "weights_only"):
                found.append(f"{where}: torch.load without weights_only=True")
            if _is_true(kw, "allow_pickle"):
                found.append(f"{where}: allow_pickle=True")
            if _is_true(kw, "trust_remote_code"):
                found.append(f"{where}: trust_remote_code=True hard-coded")
            if func.endswith("from_pretrained") and "use_safetensors" in kw and not _is_true(kw, "use_safetensors"):
                found.append(f"{where}: from_pretrained with use_safetensors other than True")
            if func in ("yaml.load", "yaml.unsafe_load") or func.endswith("read_pickle"):
                found.append(f"{where}: {func}")
    return found


def test_the_pickle_check_can_fail():
    bad = """
import pickle
from joblib import load
x = torch.load(path)
y = torch.load(path, weights_only=False)
z = np.load(p, allow_pickle=True)
m = AutoModel.from_pretrained(p, trust_remote_code=True)
"""
    found = pickle_uses(bad)
    assert len(found) == 6, found
    ok = '''"""Docstrings may say pickle."""
# comments too: torch.load(x)
w = torch.load(path, weights_only=True)
a = np.load(p, allow_pickle=False)
'''
    assert pickle_uses(ok) == []


def test_no_pickle_anywhere_in_the_package():
    found = []
    for f in sorted(PACKAGE.rglob("*.py")):
        found += pickle_uses(f.read_text(encoding="utf-8"), str(f.relative_to(PACKAGE.parent)))
    assert found == []


def test_package_ships_only_text_and_json_data():
    allowed = {".py", ".md", ".gz", ".js", ".css", ".typed"}
    shipped = [p for p in PACKAGE.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert shipped and {p.suffix for p in shipped} <= allowed, sorted({p.suffix for p in shipped} - allowed)


def _hostile_pickle(marker: Path) -> bytes:
    """Bytes that create ``marker`` when unpickled: loading them at all would be the bug."""

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    return pickle.dumps(Payload())


def test_pickled_bin_weights_are_never_loaded(tiny_dir, tmp_path, capsys):
    """A checkpoint whose only weights are a pickle (pytorch_model.bin) is refused without opening it."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for f in Path(tiny_dir).iterdir():
        if f.suffix in (".json", ".jinja"):
            shutil.copy(f, ckpt / f.name)
    marker = tmp_path / "PWNED"
    (ckpt / "pytorch_model.bin").write_bytes(_hostile_pickle(marker))
    q = tmp_path / "q.jsonl"
    q.write_text('{"question": "hi"}\n')
    assert cli.main(["generate", "--model", str(ckpt), "--questions", str(q), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "no file named model.safetensors" in err and "pickled .bin weights are not loaded" in err
    assert not marker.exists()


# -- remote code ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag, expected", [([], False), (["--trust-remote-code"], True)])
def test_trust_remote_code_is_off_unless_asked(tiny_dir, tmp_path, monkeypatch, capsys, flag, expected):
    """What transformers is finally called with, through the CLI, for tokenizer and model alike."""
    import transformers

    seen = []

    def record(kind):
        def from_pretrained(location, **kw):
            seen.append((kind, kw.get("trust_remote_code"), kw.get("use_safetensors")))
            if kind == "model":
                raise OSError("stop here")
            return real_tok(location)

        return from_pretrained

    real_tok = transformers.AutoTokenizer.from_pretrained
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", record("tokenizer"))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", record("model"))
    q = tmp_path / "q.jsonl"
    q.write_text('{"question": "hi"}\n')
    assert cli.main(["generate", "--model", str(tiny_dir), "--questions", str(q), "--out", str(tmp_path / "r"), *flag]) == 2
    assert "stop here" in capsys.readouterr().err
    assert seen == [("tokenizer", expected, None), ("model", expected, True)]


def test_every_backend_defaults_to_no_remote_code():
    import inspect

    from distill_detect.backends.capabilities import backend_kwargs
    from distill_detect.models import load_hf

    assert inspect.signature(load_hf).parameters["trust_remote_code"].default is False
    for name in backends.BACKENDS:
        params = inspect.signature(backends.get_backend_class(name).__init__).parameters
        if "trust_remote_code" in params:
            assert params["trust_remote_code"].default is False, name
    args = cli.build_parser().parse_args(["run", "--members", "m", "--nonmembers", "n", "--out", "o", "--backend", "vllm"])
    assert args.trust_remote_code is False
    kw = backend_kwargs("vllm", args, {"model": "m", "trust_remote_code": args.trust_remote_code})
    assert kw["trust_remote_code"] is False


# -- API keys ------------------------------------------------------------------------------------------------------


class _ChatServer:
    """A minimal OpenAI-compatible server (chat completions with log-probs) that records Authorization headers."""

    def __init__(self):
        self.auth: list[str] = []
        srv = self

        class Handler(JSONHandler):
            def do_GET(self):
                srv.auth.append(self.headers.get("Authorization", ""))
                self._send({"object": "list", "data": [{"id": "fake-model", "object": "model", "created": 0, "owned_by": "t"}]})

            def do_POST(self):
                srv.auth.append(self.headers.get("Authorization", ""))
                req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                n = 3 + len(req["messages"][-1]["content"]) % 4
                toks = [(f"t{i}", -0.05 * (i + 1)) for i in range(n)]
                content = [
                    {
                        "token": t,
                        "logprob": lp,
                        "bytes": list(t.encode()),
                        "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())}],
                    }
                    for t, lp in toks
                ]
                self._send(
                    {
                        "id": "c",
                        "object": "chat.completion",
                        "created": 0,
                        "model": "fake-model",
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": "".join(t for t, _ in toks)},
                                "logprobs": {"content": content},
                                "finish_reason": "stop",
                            }
                        ],
                    }
                )

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _questions(tmp_path: Path, n: int = 3) -> tuple[Path, Path]:
    m, nm = tmp_path / "members.jsonl", tmp_path / "nonmembers.jsonl"
    m.write_text("".join(json.dumps({"id": f"m{i}", "question": f"How many legs do {i} cats have?"}) + "\n" for i in range(n)))
    nm.write_text("".join(json.dumps({"id": f"n{i}", "question": f"Spell the number {i + 10}."}) + "\n" for i in range(n)))
    return m, nm


def _files_containing(root: Path, needle: bytes) -> list[str]:
    hits = []
    for p in root.rglob("*"):
        if p.is_file() and needle in p.read_bytes():
            hits.append(str(p))
    return hits


def test_api_key_reaches_the_server_and_nothing_else(tmp_path, monkeypatch, capsys):
    pytest.importorskip("openai", reason="the openai backend needs the 'openai' package")
    key = "sk-planted-" + secrets.token_hex(16)
    monkeypatch.setenv("OPENAI_API_KEY", key)
    server = _ChatServer()
    try:
        m, n = _questions(tmp_path)
        out = tmp_path / "out"
        argv = ["run", "--backend", "openai", "--base-url", server.url, "--endpoint", "chat", "--model", "fake-model"]
        argv += ["--members", str(m), "--nonmembers", str(n), "--out", str(out), "--no-prompt-logprobs", "--bootstrap", "20"]
        assert cli.main(argv) == 0
        assert cli.main(["report", str(out), "--no-figures"]) == 0
        assert cli.main(["export", str(out / "run"), "--out", str(tmp_path / "t.jsonl")]) == 0
    finally:
        server.close()
    assert server.auth and set(server.auth) == {f"Bearer {key}"}  # the key was really used
    logs = capsys.readouterr()
    assert key not in logs.out and key not in logs.err
    assert (out / "run" / "traces.sqlite").exists() and (out / "report.html").exists()
    assert _files_containing(tmp_path, key.encode()) == []
    assert _files_containing(tmp_path, key.encode("utf-16-le")) == []


@pytest.mark.slow
def test_tokens_in_the_environment_never_reach_outputs_on_the_hf_path(tiny_dir, tmp_path, monkeypatch, capsys):
    """run + report on the tiny model with an OpenAI key and a Hugging Face token planted in the environment."""
    import torch

    keys = {"OPENAI_API_KEY": "sk-planted-" + secrets.token_hex(16), "HF_TOKEN": "hf_planted" + secrets.token_hex(16)}
    for k, v in keys.items():
        monkeypatch.setenv(k, v)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        m, n = _questions(tmp_path, 2)
        out = tmp_path / "out"
        argv = ["run", "--model", str(tiny_dir), "--members", str(m), "--nonmembers", str(n), "--out", str(out)]
        assert cli.main([*argv, "--max-new-tokens", "4", "--bootstrap", "20"]) == 0
    finally:
        torch.set_num_threads(threads)
    logs = capsys.readouterr()
    assert (out / "report.html").exists() and (out / "metrics.json").exists()
    for v in keys.values():
        assert v not in logs.out and v not in logs.err
        assert _files_containing(tmp_path, v.encode()) == []


# -- paths from input files ----------------------------------------------------------------------------------------


class PlainFake:
    """Deterministic backend for the path tests (registered under the name 'fake')."""

    name = "fake"
    location = None
    capabilities = frozenset({"output_logprobs", "output_ids"})

    def __init__(self, **kwargs):
        pass

    def fingerprint(self):
        return {"backend": "fake", "model": {"tag": "v1"}}

    def generate(self, questions, *, max_new_tokens):
        out = []
        for q in questions:
            k = 2 + len(q.text) % 5
            lp = -np.arange(1, k + 1, dtype=np.float32) / (3 + len(q.text))
            out.append(
                Trace(id=q.id, question=q.text, label=q.label, output_ids=np.arange(k), output_logprobs=lp, output_text=q.id,
                      finish_reason="stop", max_new_tokens=max_new_tokens)
            )  # fmt: skip
        return out

    def close(self):
        pass


def test_ids_and_text_from_input_files_never_choose_where_files_are_written(tmp_path, monkeypatch, capsys):
    """Ids shaped like paths (relative, absolute, Windows, '..') and SQL go through run, score, export, report, merge."""
    monkeypatch.setitem(backends.BACKENDS, "fake", f"{__name__}:PlainFake")
    tag = uuid.uuid4().hex[:8]
    outside = Path("/tmp") / f"ESCAPE-abs-{tag}"
    member_ids = ["../../ESCAPE-up2", "../ESCAPE-up1", str(outside), "sub/dir/ESCAPE-sub", "..", "."]
    nonmember_ids = [
        "C:\\ESCAPE-win",
        "'); DROP TABLE traces; --",
        "<script>ESCAPE</script>",
        "~/ESCAPE-home",
        "figures/../ESCAPE-f",
        "ok",
    ]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    m, n = inputs / "m.jsonl", inputs / "n.jsonl"
    m.write_text("".join(json.dumps({"id": i, "question": f"member question {k} {i}"}) + "\n" for k, i in enumerate(member_ids)))
    n.write_text(
        "".join(json.dumps({"id": i, "question": f"other question {k} {i}"}) + "\n" for k, i in enumerate(nonmember_ids))
    )
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # relative ids would land here if used as paths
    out = tmp_path / "out"
    assert (
        cli.main(
            ["run", "--backend", "fake", "--members", str(m), "--nonmembers", str(n), "--out", str(out), "--bootstrap", "20"]
        )
        == 0
    )
    assert cli.main(["score", "--run", str(out / "run"), "--out", str(tmp_path / "scored"), "--bootstrap", "20"]) == 0
    assert cli.main(["export", str(out / "run"), "--out", str(tmp_path / "exported" / "t.jsonl")]) == 0
    assert cli.main(["report", str(out), "--ablations"]) == 0
    assert cli.main(["merge", str(out / "run"), "--out", str(tmp_path / "merged")]) == 0
    capsys.readouterr()

    every_id = member_ids + nonmember_ids
    # The ids are data: kept exactly, in every output.
    assert [json.loads(x)["id"] for x in (out / "scores.jsonl").read_text().splitlines()] == every_id
    assert [json.loads(x)["id"] for x in (tmp_path / "exported" / "t.jsonl").read_text().splitlines()] == every_id
    with TraceStore(tmp_path / "merged") as st:
        assert st.integrity_check() == [] and [t.id for t in st.traces()] == every_id
    # Nothing was written anywhere but the output locations.
    allowed = {inputs, out, tmp_path / "scored", tmp_path / "exported", tmp_path / "merged"}
    for p in tmp_path.rglob("*"):
        if p.is_file():
            assert any(a in p.parents for a in allowed), p
    assert not any(work.iterdir())
    assert not outside.exists()
    for base in (tmp_path.parent, Path.home()):
        assert not [p for p in base.glob("ESCAPE*")], base
    assert not list(tmp_path.rglob("*ESCAPE*"))
    assert os.path.exists(out / "report.html")
