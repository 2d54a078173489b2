"""Command-line flags generated from a settings dataclass whose fields carry their own metadata.

A field is written once, with ``option``: its default, its check (a predicate and the fix to suggest), the
doc that becomes its ``--help``, and optionally its flag, choices, help group and argparse ``type``. From
that, ``validate`` checks an instance (call it in ``__post_init__``; the error names the field, the value and
the fix), ``add_config_args`` adds one flag per field to a parser and ``config_from_args`` builds the
instance back from the parsed namespace. A flag left out is None in the namespace, so the dataclass's
own default applies: defaults are never listed twice.

Other keyword arguments of ``option`` are kept in the field's metadata for the caller (``finetune`` maps
fields onto trl's ``SFTConfig`` with ``sft=``).

>>> from dataclasses import dataclass
>>> @dataclass(frozen=True)
... class Opts:
...     steps: int = option(10, POSITIVE_INT, "optimizer steps")
...     def __post_init__(self):
...         validate(self)
>>> Opts(steps=0)
Traceback (most recent call last):
...
distill_detect.errors.ConfigError: steps = 0 is not valid: give a positive integer
"""

from __future__ import annotations

import math
from dataclasses import field, fields

from distill_detect.errors import ConfigError


def is_number(v) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def is_int(v) -> bool:
    """An int (not a bool)."""
    return isinstance(v, int) and not isinstance(v, bool)


# Checks: (predicate, the fix the error message suggests).
POSITIVE = (lambda v: is_number(v) and v > 0, "give a positive number")
NON_NEGATIVE = (lambda v: is_number(v) and v >= 0, "give a value >= 0")
FRACTION = (lambda v: is_number(v) and 0 <= v < 1, "give a value in [0, 1)")
POSITIVE_INT = (lambda v: is_int(v) and v >= 1, "give a positive integer")
NON_NEGATIVE_INT = (lambda v: is_int(v) and v >= 0, "give a non-negative integer")
POSITIVE_INT_OR_NONE = (lambda v: v is None or (is_int(v) and v >= 1), "give a positive integer, or None for the default")
BOOL = (lambda v: isinstance(v, bool), "give True or False")


def number(text: str) -> int | float:
    """argparse type for a count that may be fractional: '5' and '5.0' give 5, '2.5' gives 2.5."""
    value = float(text)
    return int(value) if value.is_integer() else value


def option(default, check, doc: str, *, flag=None, choices=None, group="options", type=None, **extra):
    """A dataclass field with its check, doc (= its --help), flag (default: --name-with-dashes), choices, help
    group and argparse ``type`` (default: from the annotation); ``extra`` is kept in the metadata as given."""
    check = (lambda v: v in choices, f"choose one of {', '.join(choices)}") if choices else check
    meta = dict(check=check, doc=doc, flag=flag, choices=choices, group=group, type=type, **extra)
    return field(default=default, metadata=meta)


def validate(obj) -> None:
    """Check every field of ``obj`` declared with ``option``; ConfigError naming the first bad one and its fix."""
    for f in fields(obj):
        ok, fix = f.metadata["check"]
        if not ok(getattr(obj, f.name)):
            raise ConfigError(f"{f.name} = {getattr(obj, f.name)!r} is not valid: {fix}")


def add_config_args(parser, cls, groups: dict | None = None) -> None:
    """One flag per field of ``cls``, in the argument group its metadata names (``groups`` maps a group name to an
    existing group; others are created). The dest is the field's name and the default None (= the field's)."""
    groups = dict(groups or {})
    for f in fields(cls):
        m, d = f.metadata, f.default
        group = groups.get(m["group"]) or groups.setdefault(m["group"], parser.add_argument_group(m["group"]))
        shown = "" if d is None or isinstance(d, bool) else f" (default: {d:g})" if is_number(d) else f" (default: {d})"
        kw = {"dest": f.name, "default": None, "help": (m["doc"] + shown).replace("%", "%%")}
        flag = m["flag"] or "--" + f.name.replace("_", "-")
        kind = (f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))).split(" |")[0]
        if kind == "bool":
            kw["action"] = "store_true"
        else:
            kw.update(type=m["type"] or {"float": float, "int": int, "str": str}[kind], choices=m["choices"])
            kw["metavar"] = None if m["choices"] else flag[2:].upper().replace("-", "_")
        group.add_argument(flag, **kw)


def config_from_args(args, cls):
    """An instance of ``cls`` from parsed arguments; fields whose flag was left out keep the dataclass's defaults."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None})
