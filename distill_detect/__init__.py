"""distill-detect: find the questions a language model was distilled on.

The Python API (``distill_detect.api``), importable from here:

>>> import distill_detect as dd
>>> sorted(n for n in dd.__all__ if n.islower() and not n.startswith("_"))
['audit', 'finetune', 'generate', 'load_questions', 'run', 'score']

The package imports nothing heavy at import time (no torch, transformers, sklearn,
matplotlib): ``import distill_detect`` and ``distill-detect --help`` stay instant; the API's
functions load what they need when called.
"""

from __future__ import annotations

import sys

__version__ = "0.1.0"

from distill_detect.errors import ConfigError, DistillDetectError, InputError
from distill_detect.types import GenConfig, Question, Trace

_LAZY = {
    "generate": "distill_detect.api",
    "score": "distill_detect.api",
    "run": "distill_detect.api",
    "audit": "distill_detect.api",
    "Scores": "distill_detect.api",
    "QuestionSource": "distill_detect.api",
    "ModelSettings": "distill_detect.settings",
    "finetune": "distill_detect.finetune",
    "FinetuneConfig": "distill_detect.finetune",
    "load_questions": "distill_detect.data",
}

__all__ = ["ConfigError", "DistillDetectError", "GenConfig", "InputError", "Question", "Trace", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'distill_detect' has no attribute {name!r}")


class _Package(type(sys.modules[__name__])):
    """Keeps ``dd.audit`` and ``dd.finetune`` the API's functions once the modules of the same name are
    imported (Python would otherwise set the package attribute to the submodule); the modules stay
    importable as ``distill_detect.audit`` and ``distill_detect.finetune``."""

    def __setattr__(self, name, value):
        if name in _LAZY and isinstance(value, type(sys)):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
