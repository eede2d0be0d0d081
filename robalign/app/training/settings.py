"""A setting written once: one dataclass field carries its default, help, check and command-line
form, and the four places a setting appears are generated from it —

    the YAML keys          the fields' names (:func:`robalign.app.training.config.load_settings`)
    the check              :func:`check_fields`, each field's :class:`Check` (run once per load)
    the flags              :func:`add_flags` / :func:`overrides` (``robalign train``)
    the docs' table        :func:`settings_table` (``docs/settings.md``, checked by the tests)

so adding a setting is one :func:`setting` field (and, if the loss reads it, its argument in
``DoRAConfig.build_loss``). Light on purpose: no torch, no transformers.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Any, Callable

__all__ = ["Check", "setting", "check_fields", "add_flags", "overrides", "settings_table", "flag_of"]


@dataclass(frozen=True)
class Check:
    """``ok(value, settings)`` and what a good value is, for the error that names the key."""

    ok: Callable[[Any, Any], bool]
    expected: str


def _is_int(v):
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v):
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


FLAG = Check(lambda v, s: isinstance(v, bool), "true or false")
TEXT = Check(lambda v, s: isinstance(v, str), "a string")
PATH = Check(lambda v, s: v is None or isinstance(v, str), "a string (a path)")
MAPPING = Check(lambda v, s: isinstance(v, dict), "a mapping (key: value)")
POSITIVE_INT = Check(lambda v, s: _is_int(v) and v >= 1, "an integer >= 1")
POSITIVE = Check(lambda v, s: _is_real(v) and math.isfinite(v) and v > 0, "a finite number > 0")
NON_NEGATIVE = Check(lambda v, s: _is_real(v) and math.isfinite(v) and v >= 0, "a finite number >= 0")


def between(low, high, *, low_open=False, high_open=False, optional=False) -> Check:
    """A real number in the interval (``None`` too when ``optional``)."""
    def ok(v, s):
        if v is None:
            return optional
        return (_is_real(v) and (v > low if low_open else v >= low) and (v < high if high_open else v <= high))
    text = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    return Check(ok, text + (" (or null)" if optional else ""))


def one_of(*choices) -> Check:
    return Check(lambda v, s: v in choices, f"one of {', '.join(map(str, choices))}")


def setting(default, help: str, check: Check, *, flag: str | None = None, negated: bool = False,
            parse: str | Callable | None = None, choices=None, metavar: str | None = None, per_model: bool = False,
            cli: dict | None = None, factory: Callable | None = None):
    """A dataclass field that is a setting. ``flag``: its command-line name (default ``--name``);
    ``negated``: a True default switched off by ``flag`` (``--no-weights``); ``parse``: the flag's
    argparse type, or the name of one the CLI provides (``"objective"``); ``per_model``: its
    default depends on the model (``None`` here, filled by ``resolve_defaults``); ``cli``: other
    argparse keywords (``nargs``, ``const``, ``action``)."""
    meta = dict(help=help, check=check, flag=flag, negated=negated, parse=parse, choices=choices, metavar=metavar,
                per_model=per_model, cli=cli or {})
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _settings_fields(cls):
    return [f for f in dataclasses.fields(cls) if "check" in f.metadata]


def check_fields(settings, where: str) -> None:
    """Every setting of ``settings`` passes its field's check; raises ValueError naming the key."""
    for f in _settings_fields(type(settings)):
        value = getattr(settings, f.name)
        check: Check = f.metadata["check"]
        if not check.ok(value, settings):
            shown = repr(value) if len(repr(value)) <= 40 else f"{type(value).__name__} of {len(str(value))} characters"
            expected = check.expected.format(settings=settings)
            raise ValueError(f"{where}: `{f.name}` must be {expected}, got {shown}")


def flag_of(f) -> str:
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")


def _default_text(f, model_defaults, embedded_defaults) -> str:
    if f.metadata["per_model"]:
        return f"{model_defaults[f.name]:g} for --model, {embedded_defaults[f.name]:g} for the embedded default"
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
    if isinstance(default, bool):
        return "on" if default else "off"
    if default is None:
        return "none"
    if isinstance(default, str):
        return repr(default) if default == "" else default
    return f"{default:g}" if isinstance(default, float) else str(default)


def add_flags(parser: argparse.ArgumentParser, cls, parsers: dict, model_defaults=None, embedded_defaults=None):
    """One flag per setting of ``cls``, from its field (``parsers`` maps a parse name to its type)."""
    for f in _settings_fields(cls):
        m = f.metadata
        help_text = m["help"]
        if m["negated"]:
            parser.add_argument(flag_of(f), dest=f.name, action="store_false", default=None,
                                help=f"switch off `{f.name}`: {help_text}")
            continue
        if isinstance(f.default, bool):
            parser.add_argument(flag_of(f), dest=f.name, action="store_true", default=None, help=help_text)
            continue
        default = _default_text(f, model_defaults, embedded_defaults)
        kwargs = dict(dest=f.name, default=None, help=f"{help_text} (default {default})", **m["cli"])
        parse = parsers[m["parse"]] if isinstance(m["parse"], str) else m["parse"]
        if parse is None and not m["choices"]:                 # the annotation's number type: "int | None" → int
            name = f.type.__name__ if isinstance(f.type, type) else str(f.type).split("|")[0].strip()
            parse = {"int": int, "float": float}.get(name)
        if parse is not None:
            kwargs["type"] = parse
        if m["choices"]:
            kwargs["choices"] = m["choices"]
        if m["metavar"]:
            kwargs["metavar"] = m["metavar"]
        parser.add_argument(flag_of(f), **kwargs)


def overrides(args: argparse.Namespace, cls) -> dict:
    """The settings given on the command line (a flag not given is ``None`` and left out); an
    appended flag (``--objective-arg``) becomes a mapping."""
    given = {}
    for f in _settings_fields(cls):
        value = getattr(args, f.name, None)
        if value is None:
            continue
        given[f.name] = dict(value) if f.metadata["cli"].get("action") == "append" else value
    return given


def settings_table(cls, model_defaults, embedded_defaults) -> str:
    """The settings of ``cls`` as a Markdown table: YAML key, flag, default, allowed values, meaning."""
    rows = ["| YAML key | flag | default | allowed | what it does |", "| --- | --- | --- | --- | --- |"]
    for f in _settings_fields(cls):
        m = f.metadata
        default = "on" if m["negated"] else _default_text(f, model_defaults, embedded_defaults)
        expected = re.sub(r"\s*\(\{settings\.\w+\}\)", "", m["check"].expected)     # "(20)": the value at hand
        cells = [f"`{f.name}`", f"`{flag_of(f)}`", default, expected, m["help"]]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows) + "\n"
