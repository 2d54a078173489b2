"""What the backends share (base.py) and what a new user meets first on the model side.

* One dtype rule and one device check for every backend, one set of stop tokens.
* ``--device cuda`` on a CPU-only torch, ``--model file.gguf`` on the hf backend: one line, exit 2.
* Third-party progress bars stay out of logs (stderr not a terminal).
"""

from __future__ import annotations

import pytest

from distill_detect import cli


def _qfile(tmp_path):
    q = tmp_path / "q.jsonl"
    q.write_text('{"id": "a", "question": "What is 2+2?"}\n')
    return q


# -- a new user's first hour ---------------------------------------------------------------------------


def test_device_cuda_on_cpu_only_torch_is_one_line(tiny_dir, tmp_path, monkeypatch, capsys):
    """Was a full traceback (AssertionError: Torch not compiled with CUDA enabled), exit 1."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    argv = ["generate", "--model", str(tiny_dir), "--questions", str(_qfile(tmp_path)), "--out", str(tmp_path / "r")]
    assert cli.main([*argv, "--device", "cuda", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "--device cuda" in err and "no CUDA" in err and "--device cpu" in err and torch.__version__ in err


def test_gguf_file_on_the_hf_backend_names_llamacpp(tmp_path, capsys):
    """Was: 'expected a Hugging Face checkpoint directory with a config.json'."""
    gguf = tmp_path / "model.Q4_K_M.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00")
    argv = ["generate", "--model", str(gguf), "--questions", str(_qfile(tmp_path)), "--out", str(tmp_path / "r")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--backend llamacpp" in err and "GGUF" in err


@pytest.mark.slow
def test_gguf_conversion_prints_no_progress_bar_into_a_log(tmp_path, monkeypatch, capfd):
    """transformers' 'Converting and de-quantizing GGUF tensors' bar (tqdm) is for terminals only."""
    import transformers

    from distill_detect.models import default_model_dir

    monkeypatch.setenv("DISTILL_DETECT_CACHE", str(tmp_path / "cache"))
    transformers.utils.logging.enable_progress_bar()  # as in a fresh process (another test may have turned it off)
    capfd.readouterr()
    out = default_model_dir(progress=True)
    err = capfd.readouterr().err
    assert (out / "model.safetensors").exists()
    assert "de-quantizing" not in err and "\r" not in err, err[-500:]
    assert "Converting the embedded SmolLM2" in err  # our own one-line notice stays


# -- one precision rule, one device check, one set of stop tokens ---------------------------------------


def test_resolve_dtype_is_one_rule():
    from distill_detect.backends.base import resolve_dtype
    from distill_detect.errors import ConfigError

    cases = {
        ("auto", "cpu", "bfloat16"): "float32",
        ("auto", "cpu", None): "float32",
        ("auto", "cuda", "bfloat16"): "bfloat16",
        ("auto", "cuda", "float16"): "float16",
        ("auto", "cuda", "torch.float16"): "float16",
        ("auto", "cuda", "float32"): "bfloat16",  # vLLM's own 'auto' would say float16 here
        ("auto", "cuda", None): "bfloat16",
        (None, "cuda", "float32"): "bfloat16",
        ("float32", "cuda", "bfloat16"): "float32",
        ("float16", "cpu", None): "float16",
    }
    for (req, dev, own), want in cases.items():
        assert resolve_dtype(req, dev, own) == want, (req, dev, own)
    with pytest.raises(ConfigError, match="--dtype 'fp8': choose auto, float32, bfloat16, float16"):
        resolve_dtype("fp8", "cuda", None)


def test_hf_backend_records_the_resolved_dtype(tiny_dir):
    from distill_detect.backends.base import resolve_dtype
    from distill_detect.backends.hf import HFBackend

    fp = HFBackend(str(tiny_dir), device="cpu").fingerprint()
    assert fp["dtype"] == resolve_dtype("auto", "cpu", "float32") == "float32" and fp["device"] == "cpu"


class _Torch:
    """Just what resolve_device reads from torch."""

    def __init__(self, *, build_cuda, gpus):
        import types

        self.__version__ = "2.9.0+cu128" if build_cuda else "2.9.0+cpu"
        self.version = types.SimpleNamespace(cuda="12.8" if build_cuda else None)
        self.cuda = types.SimpleNamespace(is_available=lambda: gpus > 0, device_count=lambda: gpus)


def test_resolve_device_names_what_is_missing(monkeypatch):
    from distill_detect.backends.base import resolve_device
    from distill_detect.errors import ConfigError

    assert resolve_device("auto", _Torch(build_cuda=False, gpus=0)) == "cpu"
    assert resolve_device("auto", _Torch(build_cuda=True, gpus=1)) == "cuda"
    assert resolve_device("cuda:1", _Torch(build_cuda=True, gpus=2)) == "cuda:1"
    assert resolve_device("cpu", _Torch(build_cuda=True, gpus=2)) == "cpu"
    with pytest.raises(ConfigError, match=r"this torch build has no CUDA \(torch 2.9.0\+cpu\); use --device cpu, or install"):
        resolve_device("cuda", _Torch(build_cuda=False, gpus=0))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(ConfigError, match=r"sees no GPU \(CUDA_VISIBLE_DEVICES=''\); use --device cpu"):
        resolve_device("cuda:0", _Torch(build_cuda=True, gpus=0))
    with pytest.raises(ConfigError, match=r"--device cuda:2: torch sees 2 GPU\(s\) \(cuda:0 .. cuda:1\)"):
        resolve_device("cuda:2", _Torch(build_cuda=True, gpus=2))


def test_stop_token_ids_one_set():
    from distill_detect.backends.base import require_stop_ids, stop_token_ids
    from distill_detect.errors import DistillDetectError

    class Tok:
        eos_token_id = 2

        def get_vocab(self):
            return {"<|im_end|>": 7, "<|eot_id|>": 9, "hello": 11}

    assert stop_token_ids(Tok()) == {2, 7, 9}
    assert stop_token_ids(Tok(), 5) == stop_token_ids(Tok(), [5]) == {2, 5, 7, 9}
    with pytest.raises(DistillDetectError, match="no EOS or end-of-turn token"):
        require_stop_ids(set())


# -- one library: options declared once, no private imports between backends ------------------------------


def test_backend_options_are_declared_next_to_their_constructor():
    """Each backend's own CLI options map argparse dests onto constructor keywords that exist."""
    import inspect

    from distill_detect.backends import BACKENDS, get_backend_class

    parser_args = cli.build_parser().parse_args(["run", "--members", "m", "--nonmembers", "n", "--out", "o"])
    for name in BACKENDS:
        try:
            cls = get_backend_class(name)
        except Exception:  # a backend whose module cannot be imported here
            continue
        params = inspect.signature(cls.__init__).parameters
        for dest, kw in cls.cli_options.items():
            assert kw in params, (name, kw)
            assert hasattr(parser_args, dest), (name, dest)


def test_backends_import_no_private_helper_of_another_backend():
    import ast
    from pathlib import Path

    import distill_detect.backends as pkg

    folder = Path(pkg.__file__).parent
    for f in folder.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("distill_detect.backends."):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{f.name} imports {private} from {node.module}"
