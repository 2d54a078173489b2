"""What a detector is: a pure function of one trace, plus the facts the pipeline needs about it.

A detector never touches a model, a file or the network. Its hyperparameters are
keyword-only with the published defaults. ``higher_is_member`` states the direction
of its raw score; ``membership_score`` in ``distill_detect.metrics`` is the one place
where that direction is applied.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from distill_detect.errors import ConfigError
from distill_detect.types import Trace


@dataclass(frozen=True)
class Detector:
    name: str
    """Registry name, used in ``--methods`` and as the key in scores.jsonl."""
    fn: Callable[..., float]
    """``fn(trace, **params) -> float``; NaN when the trace lacks what it needs is not allowed: raise."""
    higher_is_member: bool
    """Direction of the raw score. TPD is False (lower TPD = more likely a member)."""
    needs: frozenset = field(default_factory=frozenset)
    """Trace fields that must be present: 'output_logprobs', 'output_stats', 'prompt_logprobs', 'prompt_stats',
    'question', or 'extra:<key>' for arrays added by a later pass (e.g. a reference model)."""
    defaults: dict = field(default_factory=dict)
    """Hyperparameters and their defaults."""
    summary: str = ""
    """One line for ``--help`` and reports."""
    budget_param: str | None = None
    """Name of the hyperparameter that caps how many generated tokens it reads, if any."""

    def token_budget(self, params: dict | None = None) -> int | None:
        """Generated tokens this detector reads with these params (None: it reads none or all)."""
        if self.budget_param is None:
            return None
        merged = {**self.defaults, **(params or {})}
        return int(merged[self.budget_param])

    def __call__(self, trace: Trace, **params) -> float:
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            known = ", ".join(sorted(self.defaults)) or "none"
            raise ConfigError(f"method {self.name!r} has no parameter {', '.join(map(repr, unknown))}; its parameters: {known}")
        return float(self.fn(trace, **{**self.defaults, **params}))


def add_unique(table: dict, item, kind: str):
    """Register ``item`` under ``item.name`` in ``table`` (detectors, passes); a second one of that name is a bug."""
    if item.name in table:
        raise ValueError(f"{kind} {item.name!r} registered twice")
    table[item.name] = item
    return item
