"""Which detection methods each backend can run, and refusing the others before any model time.

A method's ``Detector.needs`` names trace fields; a backend's ``capabilities`` names what
it can fill. The mapping between them:

==================================  ==========================================================
need                                backend capability it takes
==================================  ==========================================================
``output_logprobs``                 ``output_logprobs`` (every backend)
``output_stats``                    ``output_stats`` (full logits: hf)
``prompt_logprobs``                 ``prompt_logprobs`` (teacher-forced prompt: hf, vllm, echo APIs)
``prompt_stats``                    ``prompt_stats`` (full logits over the prompt: hf)
``question``                        nothing (the store keeps the text)
``extra:lowercase_prompt_logprobs`` ``prompt_logprobs`` (the lowercase pass calls ``score_prompts``)
``extra:reference_prompt_logprobs`` nothing from the student (the reference model scores it)
``extra:reference_output_logprobs`` ``output_ids`` (the reference teacher-forces the student's tokens)
``extra:dcpdd_token_freq``          ``prompt_logprobs`` (question token ids come with them)
``output_text``                     nothing (every backend returns the greedy answer's text)
``output_samples``                  ``samples`` (answers sampled at a temperature: every backend)
``solution``                        nothing (the question file has it)
==================================  ==========================================================

With log-probabilities off (``--no-logprobs``, the openai backend's ``text_only()``) a backend
keeps only ``samples``: the text-only methods (``detectors.TEXT_ONLY``) are what is left.

A backend class declares ``capabilities`` (always there) and may declare
``conditional_capabilities`` ({capability: the condition}) for what depends on the
server or on local files (the OpenAI-compatible backend). ``output_ids`` is assumed
unless a backend lists it as conditional. An instance may narrow ``capabilities`` once it
knows (e.g. after probing a server); ``check_methods`` is then called on the instance.
"""

from __future__ import annotations

import inspect
import json

from distill_detect.detectors.checks import NEEDS
from distill_detect.errors import ConfigError

NEED_CAPABILITY: dict[str, tuple[str, ...]] = {k: n.capabilities for k, n in NEEDS.items()}
"""Need word -> the backend capabilities it takes (from the one table in ``detectors.checks``)."""

CAPABILITY_WORDS = {
    "output_logprobs": "log-probabilities of the generated tokens",
    "output_ids": "the generated token ids",
    "output_stats": "full-vocabulary statistics at each generated step",
    "prompt_logprobs": "log-probabilities of the question tokens (teacher-forced prompt)",
    "prompt_stats": "full-vocabulary statistics at each question token",
    "samples": "answers sampled at a temperature",
    "score": "log-probabilities of a given text teacher-forced after the prompt",
}


def required_capabilities(method: str) -> set[str]:
    """Backend capabilities a method needs from the student backend.

    >>> sorted(required_capabilities("tpd"))
    ['output_logprobs']
    >>> sorted(required_capabilities("min_k_pp"))
    ['prompt_logprobs', 'prompt_stats']
    """
    from distill_detect.detectors import get

    caps: set[str] = set()
    for need in get(method).needs:
        caps.update(NEED_CAPABILITY.get(need, ()))
    return caps


def _declared(backend) -> tuple[set[str], dict[str, str]]:
    """(capabilities present, {capability: condition}) of a backend class or instance."""
    cls = backend if isinstance(backend, type) else type(backend)
    conditional = dict(getattr(cls, "conditional_capabilities", {}) or {})
    have = set(backend.capabilities)
    if "output_ids" not in conditional:
        have.add("output_ids")
    if not isinstance(backend, type):
        conditional = {}  # an instance knows: what it lacks now, it lacks
    return have, {k: v for k, v in conditional.items() if k not in have}


def support(backend, method: str) -> tuple[str, str]:
    """('yes' | 'if' | 'no', reason) for running ``method`` on ``backend`` (class or instance)."""
    have, conditional = _declared(backend)
    missing = sorted(required_capabilities(method) - have)
    if not missing:
        return "yes", ""
    if all(m in conditional for m in missing):
        return "if", "; ".join(f"{CAPABILITY_WORDS[m]}: {conditional[m]}" for m in missing)
    lacking = [m for m in missing if m not in conditional]
    return "no", "needs " + " and ".join(CAPABILITY_WORDS.get(m, m) for m in lacking)


def check_methods(backend, methods, *, name: str | None = None) -> None:
    """Refuse, with the reason, methods this backend cannot run (class: only the impossible ones)."""
    label = name or getattr(backend, "name", "?")
    bad = []
    for m in methods:
        verdict, reason = support(backend, m)
        if verdict == "no":
            bad.append(f"{m!r} ({reason})")
    if bad:
        from distill_detect.detectors import REGISTRY

        what = "this server/backend" if not isinstance(backend, type) else f"the {label} backend"
        left = [m for m in REGISTRY if support(backend, m)[0] != "no"]
        logprobs_off = not isinstance(backend, type) and getattr(backend, "logprobs", True) is False
        why = " (log-probabilities are off: --no-logprobs)" if logprobs_off else ""
        raise ConfigError(
            f"{what} cannot run {', '.join(bad)}: it does not provide them{why}. Choose other --methods "
            f"(it can run {', '.join(left) or 'none'}; see 'distill-detect backends') or another --backend"
        )


def table(backends: dict[str, type], methods: list[str]) -> str:
    """The capability table as text: one row per method, one column per backend."""
    names = list(backends)
    width = max(len(m) for m in methods) + 2
    col = max(10, *(len(n) + 2 for n in names))
    lines = ["method".ljust(width) + "".join(n.ljust(col) for n in names)]
    notes: dict[str, int] = {}
    for m in methods:
        cells = []
        for n in names:
            verdict, reason = support(backends[n], m)
            if verdict == "if":
                k = notes.setdefault(f"{n}: {reason}", len(notes) + 1)
                cells.append(f"if[{k}]")
            else:
                cells.append(verdict)
        lines.append(m.ljust(width) + "".join(c.ljust(col) for c in cells))
    if notes:
        lines.append("")
        lines += [f"[{k}] {text}" for text, k in notes.items()]
    return "\n".join(lines)


def cmd_backends(args) -> int:
    from distill_detect.backends import BACKENDS, get_backend_class
    from distill_detect.detectors import REGISTRY

    classes, broken = {}, []
    for name in BACKENDS:
        try:
            classes[name] = get_backend_class(name)
        except Exception as exc:  # a backend module that cannot even be imported is reported, not fatal
            broken.append(f"{name}: cannot be imported ({exc})")
    print(table(classes, list(REGISTRY)))
    for line in broken:
        print(line)
    print("\n'yes': always; 'if[n]': when the condition holds (checked when the backend starts, before generating); 'no': never.")
    from distill_detect.pipeline import text_only_methods

    print(f"'--no-logprobs' (openai, a server that returns text only): {', '.join(text_only_methods())} (docs/black-box.md).")
    return 0


# -- CLI options of the scale-out backends ----------------------------------------------------------


def add_backend_args(p, *, shard: bool = False) -> None:
    """Options of the openai/vllm backends and of distributed generation (added to generate and run)."""
    g = p.add_argument_group("OpenAI-compatible server (--backend openai)")
    g.add_argument("--base-url", default=None, help="server URL, e.g. http://127.0.0.1:8000/v1")
    g.add_argument(
        "--api-key-env",
        default="OPENAI_API_KEY",
        help="NAME of the environment variable holding the API key (default: OPENAI_API_KEY)",
    )
    g.add_argument(
        "--endpoint",
        choices=("completions", "chat"),
        default="completions",
        help="/v1/completions with the local chat template (default) or /v1/chat/completions",
    )
    g.add_argument(
        "--tokenizer",
        default=None,
        help="local tokenizer/chat template of the served model (default: the embedded model's for --model default)",
    )
    g.add_argument("--concurrency", type=int, default=4, help="requests in flight at once (default: 4); use --batch-size >= this")
    g.add_argument(
        "--extra-body",
        default=None,
        metavar="JSON",
        help="server-specific request fields, e.g. '{\"repeat_penalty\": 1.0}' for llama.cpp",
    )
    g = p.add_argument_group("vLLM (--backend vllm)")
    g.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs per model (default: 1)")
    g.add_argument(
        "--gpu-memory-utilization", type=float, default=0.9, help="fraction of GPU memory vLLM may take (default: 0.9)"
    )
    g.add_argument("--max-model-len", type=int, default=None, help="context length to reserve (default: the model's)")
    g = p.add_argument_group("scale-out")
    g.add_argument("--workers", type=int, default=None, help="generate with N Ray actors, each with its own backend")
    g.add_argument("--ray-address", default=None, help="Ray cluster to join (e.g. auto); default: start a local one")
    if shard:
        g.add_argument(
            "--shard",
            default=None,
            metavar="I/N",
            help="only the questions of shard I of N (by id hash); combine runs with 'merge'",
        )


def backend_kwargs(name: str, args, base: dict) -> dict:
    """Constructor arguments for backend ``name``: ``base`` (the common ones) filtered to what its
    ``__init__`` accepts, plus its own options from ``args`` (``cls.cli_options``: argparse dest ->
    keyword, declared next to the constructor that takes them)."""
    from distill_detect.backends import get_backend_class
    from distill_detect.backends.base import cpu_threads

    cls = get_backend_class(name)
    params = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    out = {k: v for k, v in base.items() if takes_any or k in params}
    for arg, kw in getattr(cls, "cli_options", {}).items():
        value = getattr(args, arg, None)
        if arg == "extra_body" and isinstance(value, str):  # the CLI's JSON text (settings may pass a dict)
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"--extra-body {value!r}: not valid JSON ({exc.msg})") from None
            if not isinstance(value, dict):
                raise ConfigError("--extra-body must be a JSON object, e.g. '{\"repeat_penalty\": 1.0}'")
        if arg == "threads" and value is not None:
            value = cpu_threads(value)  # refuses 0 and negatives, naming --threads
        if value is not None:
            out[kw] = value
    return out


def checked_factory(make, args, methods=None):
    """Wrap a backend factory: refuse impossible methods now (by class) and again once the backend is up."""
    from distill_detect.backends import get_backend_class

    if methods:
        check_methods(get_backend_class(args.backend), methods, name=args.backend)

    def build():
        backend = make()
        if methods:
            try:
                check_methods(backend, methods)
            except ConfigError:
                backend.close()
                raise
        return backend

    return build
