"""distill-detect: find the questions a language model was distilled on.

The package imports nothing heavy at import time (no torch, transformers, sklearn,
matplotlib): ``import distill_detect`` and ``distill-detect --help`` stay instant.
"""

from __future__ import annotations

__version__ = "0.1.0"

from distill_detect.errors import DistillDetectError, InputError
from distill_detect.types import GenConfig, Question, Trace

__all__ = ["DistillDetectError", "GenConfig", "InputError", "Question", "Trace", "__version__"]
