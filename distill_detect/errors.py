"""Errors that reach the user as one line.

Every error a user can cause (a bad file, a wrong option, a model that cannot be
loaded) is a ``DistillDetectError``; the CLI prints its message on one line and
exits non-zero, with no traceback unless ``--debug`` is given. Anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations


class DistillDetectError(Exception):
    """An error caused by input or environment, with a message meant for the user."""

    exit_code = 2


class InputError(DistillDetectError):
    """Bad content in an input file: names the file, the line and the field.

    >>> str(InputError("q.jsonl", "missing field 'question'", line=3, field="question"))
    "q.jsonl:3: field 'question': missing field 'question'"
    """

    def __init__(self, path, problem: str, *, line: int | None = None, field: str | None = None):
        self.path = str(path)
        self.line = line
        self.field = field
        self.problem = problem
        where = self.path if line is None else f"{self.path}:{line}"
        what = problem if field is None else f"field '{field}': {problem}"
        super().__init__(f"{where}: {what}")


class ConfigError(DistillDetectError):
    """An option with a value that cannot work; the message names the option, the value and the fix."""


class MissingDependencyError(DistillDetectError):
    """An optional dependency is not installed; the message gives the exact install line."""

    def __init__(self, module: str, extra: str, purpose: str):
        super().__init__(
            f"{purpose} needs the '{module}' package, which is not installed. "
            f"Install it with: pip install 'distill-detect[{extra}]'"
        )


def require(module: str, extra: str, purpose: str):
    """Import ``module`` or raise ``MissingDependencyError`` with an install hint."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        if exc.name and exc.name.split(".")[0] != module.split(".")[0]:
            raise
        raise MissingDependencyError(module, extra, purpose) from exc
