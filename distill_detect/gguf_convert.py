"""Hugging Face checkpoint folder -> GGUF (f16 or q8_0), cached and bound to the checkpoint's hash.

So that ``--backend llamacpp --model ./student`` audits a student fine-tuned with
``distill-detect finetune`` (a transformers folder) on llama.cpp's CPU kernels. Written with
the ``gguf`` Python package (the same package llama.cpp's own ``convert_hf_to_gguf.py`` is built
on, which is not shipped with llama-cpp-python), following that script's rules for the Llama
architecture:

* Llama (and Mistral) and Qwen2 checkpoints; tensor names from ``gguf.get_tensor_name_map``; for
  Llama the query and key projections permuted from the Hugging Face rotary layout (two halves) to
  llama.cpp's (interleaved pairs; its Qwen2 graph rotates halves, as HF does); a tied output head is
  left out (llama.cpp reads the token embedding then);
* 2-D weights stored as float16 (``f16``) or 8-bit blocks of 32 with one scale each (``q8_0``,
  ``gguf.quants``), the token embedding included; norms stay float32;
* the tokenizer copied from ``tokenizer.json``: tokens in id order, added special tokens as
  CONTROL, other added tokens USER_DEFINED, merges, special ids and the chat template
  (``gguf.SpecialVocab``), and the pre-tokenizer named from the tokenizer's own pre-tokenizer
  (byte-level GPT-2, SmolLM's digit split, or Llama 3's regex; others are refused).

Every conversion is checked before it is cached: the GGUF's tokenizer (llama.cpp) must give the
same token ids as the Hugging Face tokenizer on a set of probe texts (digits, whitespace,
unicode, chat markup), else it is refused and nothing is kept.

The file lives at ``<cache>/gguf/<hash>-<quant>.gguf``, ``hash`` being a sha256 over the
checkpoint's config, tokenizer and weight files (their full contents, hashed once per
path/size/mtime) and this converter's version: a changed checkpoint is converted again.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from distill_detect.errors import ConfigError, DistillDetectError, require

QUANTS = ("f16", "q8_0")
CONVERTER_VERSION = 1
"""Part of the cache key: a change to what the converter writes re-converts every checkpoint."""

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
"""HF architectures converted, and llama.cpp's name for them (Mistral is the Llama graph)."""
_GGUF_ARCH = {"llama": "LLAMA", "qwen2": "QWEN2"}

_HASHED = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "chat_template.jinja", "chat_template.json", "model.safetensors.index.json",
)  # fmt: skip

_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = _LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")

PROBES = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "12345 + 6789 = 19134; 3.14159, -0.5e10, $1,000,000.00 and 7/8ths",
    "  leading spaces\tand tabs\n\nnew lines   trailing  ",
    "Ünïcödé: naïve café, 日本語のテキスト, emoji 🤖🎉, Привет мир",
    "def f(x):\n    return x ** 2  # comment\n",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "don't you'll we're I'M SHOUTING",
)
"""Texts on which the GGUF's tokenizer must give the HF tokenizer's ids (special markup parsed)."""


def checkpoint_hash(folder: Path) -> str:
    """sha256 (hex) of what defines a converted model: config, tokenizer and weight files, and the converter version.

    Each file enters by name and full-content sha256 (memoised per path, size and mtime, so a large
    checkpoint is read once); a file that is added, removed or changed changes the hash.
    """
    from distill_detect.backends.llamacpp import gguf_sha256

    folder = Path(folder)
    files = [folder / n for n in _HASHED if (folder / n).is_file()]
    files += sorted(folder.glob("*.safetensors")) + sorted(folder.glob("tokenizer.model"))
    if not any(f.suffix == ".safetensors" for f in files):
        raise ConfigError(
            f"--model {str(folder)!r}: no *.safetensors weights in the checkpoint folder (needed to convert it to GGUF)"
        )
    h = hashlib.sha256(f"distill-detect gguf converter v{CONVERTER_VERSION}\n".encode())
    for f in files:
        h.update(f"{f.name}\0{gguf_sha256(f)}\n".encode())
    return h.hexdigest()


def gguf_path(folder: Path, quant: str) -> Path:
    """Where the conversion of ``folder`` at ``quant`` is cached."""
    from distill_detect.models import cache_dir

    return cache_dir() / "gguf" / f"{checkpoint_hash(folder)[:24]}-{quant}.gguf"


def ensure_gguf(folder: str | Path, quant: str = "f16", *, progress: bool = True) -> Path:
    """The cached GGUF of checkpoint ``folder`` at ``quant`` ('f16' or 'q8_0'), converting it first if needed."""
    if quant not in QUANTS:
        raise ConfigError(f"--gguf-quant {quant!r}: choose {' or '.join(QUANTS)}")
    folder = Path(folder).expanduser().resolve()
    out = gguf_path(folder, quant)
    if out.is_file():
        return out
    import sys

    if progress:
        print(f"Converting {folder} to GGUF ({quant}) in {out} (once per checkpoint)...", file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.stem}.{os.getpid()}.tmp")
    try:
        convert(folder, tmp, quant)
        verify_tokenizer(folder, tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


# -- pure pieces ---------------------------------------------------------------------------------


def permute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of a q/k projection reordered from HF's rotary layout to llama.cpp's.

    HF rotates the two halves of each head's vector against each other; llama.cpp (like the
    original Llama code) rotates adjacent pairs. Within each head, row ``h*d + i`` (first half,
    i < d/2) goes to ``h*d + 2i`` and row ``h*d + d/2 + i`` to ``h*d + 2i + 1``; the same
    reshape as ``convert_hf_to_gguf.py``'s ``LlamaModel.permute``.
    """
    d = w.shape[0] // n_head
    return w.reshape(n_head, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's name (``tokenizer.ggml.pre``) for a byte-level BPE tokenizer's pre-tokenizer, or ConfigError.

    Recognised: GPT-2's byte-level regex alone ('gpt-2'); SmolLM's single-digit split before it
    ('smollm'); Llama 3's or Qwen2's split regex before a byte-level step without regex ('llama-bpe', 'qwen2').
    """
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        if regex == _LLAMA3_REGEX:
            return "llama-bpe"
        if regex == _QWEN2_REGEX:
            return "qwen2"
    raise ConfigError(
        f"the checkpoint's tokenizer pre-tokenizer ({'/'.join(map(str, kinds)) or 'none'}) is not one this converter "
        "knows (byte-level GPT-2, SmolLM, Llama 3, Qwen2); convert it with llama.cpp's convert_hf_to_gguf.py and pass the .gguf"
    )


def vocab_tokens(tokenizer_json: dict, n_vocab: int) -> tuple[list[str], list[int]]:
    """(token strings in id order, GGUF token types) from ``tokenizer.json``.

    Types as llama.cpp's converter sets them: added special tokens CONTROL, other added tokens
    USER_DEFINED, the rest NORMAL; ids no token has (padding of the embedding) '[PAD<i>]', USER_DEFINED.
    """
    import gguf

    T = gguf.TokenType
    by_id: dict[int, tuple[str, int]] = {i: (t, T.NORMAL) for t, i in tokenizer_json["model"]["vocab"].items()}
    for a in tokenizer_json.get("added_tokens", []):
        by_id[int(a["id"])] = (a["content"], T.CONTROL if a.get("special") else T.USER_DEFINED)
    if by_id and max(by_id) >= n_vocab:
        raise ConfigError(f"the tokenizer has token id {max(by_id)} but the model's vocabulary is {n_vocab}")
    tokens, types = [], []
    for i in range(n_vocab):
        tok, typ = by_id.get(i, (f"[PAD{i}]", T.USER_DEFINED))
        tokens.append(tok)
        types.append(int(typ))
    return tokens, types


def hf_to_gguf_tensor(name: str, w: np.ndarray, cfg: dict, quant: str):
    """(GGUF name, array, raw dtype or None) for one HF tensor; None for a tensor llama.cpp does not read."""
    import gguf

    if name.endswith("rotary_emb.inv_freq"):
        return None
    if name == "lm_head.weight" and cfg.get("tie_word_embeddings", False):
        return None
    arch = ARCHITECTURES.get((cfg.get("architectures") or ["LlamaForCausalLM"])[0], "llama")
    if arch == "llama" and name.endswith("self_attn.q_proj.weight"):  # qwen2 rotates halves in llama.cpp too
        w = permute_rotary(w, cfg["num_attention_heads"])
    elif arch == "llama" and name.endswith("self_attn.k_proj.weight"):
        w = permute_rotary(w, cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
    tmap = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, _GGUF_ARCH[arch]), cfg["num_hidden_layers"])
    new = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
    if new is None:
        raise ConfigError(f"the checkpoint has a tensor {name!r} the {arch} graph of llama.cpp has no place for")
    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.ndim == 1:
        return new, w, None
    if quant == "q8_0" and w.shape[-1] % 32 == 0:
        return new, gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return new, w.astype(np.float16), None


def _rope(cfg: dict) -> float:
    """The rotary base; refuses scaled rotary embeddings (not converted here)."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind != "default":
        raise ConfigError(f"rotary scaling {kind!r} is not converted here; use llama.cpp's convert_hf_to_gguf.py")
    return float(params.get("rope_theta") or cfg.get("rope_theta") or 10000.0)


def _adds_bos(folder: Path, tokenizer_json: dict) -> bool:
    """Whether the HF tokenizer puts a BOS token in front of plain text (its post-processor's template)."""
    post = tokenizer_json.get("post_processor") or {}
    single = post.get("single") or []
    if any("SpecialToken" in step for step in single):
        return True
    try:
        return bool(json.loads((folder / "tokenizer_config.json").read_text()).get("add_bos_token", False))
    except (OSError, ValueError):
        return False


# -- the conversion ------------------------------------------------------------------------------


def convert(folder: Path, out: Path, quant: str) -> None:
    """Write the GGUF of checkpoint ``folder`` to ``out`` (see the module docstring)."""
    gguf = require("gguf", "llamacpp", "Converting a checkpoint to GGUF")
    safetensors = require("safetensors", "hf", "Reading the checkpoint's weights")
    torch = require("torch", "hf", "Reading the checkpoint's weights")
    cfg = json.loads((folder / "config.json").read_text())
    arch = (cfg.get("architectures") or ["?"])[0]
    if arch not in ARCHITECTURES:
        raise ConfigError(
            f"--model {str(folder)!r}: {arch} checkpoints are not converted here (only {', '.join(ARCHITECTURES)}); "
            "convert it with llama.cpp's convert_hf_to_gguf.py and pass the .gguf, or use --backend hf"
        )
    if not (folder / "tokenizer.json").is_file():
        raise ConfigError(f"--model {str(folder)!r}: no tokenizer.json (a fast tokenizer is needed to convert to GGUF)")
    tj = json.loads((folder / "tokenizer.json").read_text())
    if (tj.get("model") or {}).get("type") != "BPE":
        raise ConfigError(f"--model {str(folder)!r}: only byte-level BPE tokenizers are converted here")
    pre = pre_tokenizer_name(tj)
    n_head = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    n_vocab = int(cfg["vocab_size"])

    w = gguf.GGUFWriter(str(out), ARCHITECTURES[arch])
    w.add_name(folder.name)
    w.add_context_length(int(cfg.get("max_position_embeddings") or 4096))
    w.add_embedding_length(int(cfg["hidden_size"]))
    w.add_block_count(int(cfg["num_hidden_layers"]))
    w.add_feed_forward_length(int(cfg["intermediate_size"]))
    w.add_head_count(int(n_head))
    w.add_head_count_kv(int(cfg.get("num_key_value_heads") or n_head))
    w.add_rope_freq_base(_rope(cfg))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    w.add_rope_dimension_count(int(head_dim))
    if head_dim != cfg["hidden_size"] // n_head:
        w.add_key_length(int(head_dim))
        w.add_value_length(int(head_dim))
    w.add_vocab_size(n_vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if quant == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    tokens, types = vocab_tokens(tj, n_vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=n_vocab)
    if not special.merges:
        raise ConfigError(f"--model {str(folder)!r}: tokenizer.json has no merges")
    special.add_special_token["bos"] = _adds_bos(folder, tj)
    special.add_special_token.setdefault("eos", False)
    special.add_to_gguf(w, quiet=True)

    files = sorted(folder.glob("*.safetensors"))
    for f in files:
        with safetensors.safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                got = hf_to_gguf_tensor(name, st.get_tensor(name).to(torch.float32).numpy(), cfg, quant)
                if got is not None:
                    new, arr, raw = got
                    w.add_tensor(new, arr, raw_dtype=raw)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()


def verify_tokenizer(folder: Path, gguf_file: Path, texts=PROBES) -> None:
    """Refuse a GGUF whose tokenizer gives other ids than the checkpoint's own on ``texts`` (special markup parsed)."""
    from tokenizers import Tokenizer

    lc = require("llama_cpp", "llamacpp", "Checking a converted GGUF")
    hf = Tokenizer.from_file(str(folder / "tokenizer.json"))
    llm = lc.Llama(str(gguf_file), vocab_only=True, verbose=False)
    try:
        for text in texts:
            want = hf.encode(text, add_special_tokens=False).ids
            got = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
            if list(got) != list(want):
                raise DistillDetectError(
                    f"the GGUF converted from {folder} tokenizes {text[:40]!r} differently from the checkpoint's tokenizer "
                    f"({got[:12]} vs {want[:12]}); not cached. Convert it with llama.cpp's convert_hf_to_gguf.py instead"
                )
    finally:
        llm.close()
