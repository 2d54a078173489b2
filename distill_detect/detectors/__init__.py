"""Detector registry: name -> Detector. Every detector is a pure function of a Trace."""

from __future__ import annotations

import difflib

from distill_detect.detectors.base import Detector
from distill_detect.detectors.tpd import tpd
from distill_detect.errors import ConfigError

REGISTRY: dict[str, Detector] = {}


def register(det: Detector) -> Detector:
    if det.name in REGISTRY:
        raise ValueError(f"detector {det.name!r} registered twice")
    REGISTRY[det.name] = det
    return det


register(
    Detector(
        name="tpd",
        fn=tpd,
        higher_is_member=False,
        needs=frozenset({"output_logprobs"}),
        defaults={"tau": 1.0, "alpha": 0.6, "max_tokens": 300},
        summary="Token Probability Deviation on the first M greedy tokens (Zhang et al. 2025); lower = member",
        budget_param="max_tokens",
    )
)


def get(name: str) -> Detector:
    """Look a detector up by name; an unknown name gets a did-you-mean error."""
    try:
        return REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, REGISTRY, n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ConfigError(f"unknown method {name!r}.{hint} Known methods: {', '.join(sorted(REGISTRY))}") from None


def parse_methods(spec: str | list[str]) -> list[str]:
    """'tpd,loss' or ['tpd', 'loss'] -> validated list of names, order kept, no duplicates."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for n in (x.strip() for x in names):
        if n and n not in out:
            get(n)
            out.append(n)
    if not out:
        raise ConfigError("no method given; use e.g. --methods tpd")
    return out
