"""Click options generated from the config models (hpcpath.config), so a default, a choice
list or a field's description is stated once, in the model.

Each option's click default is ``None``: a flag the user did not give leaves the value to the
YAML config file, then to the model's default (``Model.load(config_file, **options)``).  The
help shows the model's default in brackets.
"""

from __future__ import annotations

import enum
import types
import typing
from collections.abc import Callable
from typing import Any, Literal

import click
from pydantic import BaseModel

__all__ = ["config_option", "config_options"]


def _unwrap(annotation: Any) -> Any:
    """``X | None`` -> ``X`` (an optional field is an option the user may leave out)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _click_type(annotation: Any) -> tuple[Any, bool]:
    """(click type, is a boolean flag) for a field's annotation (of a tuple: of its items)."""
    t = _unwrap(annotation)
    if typing.get_origin(t) is tuple:
        t = typing.get_args(t)[0]
    if typing.get_origin(t) is Literal:
        return click.Choice([str(v) for v in typing.get_args(t)]), False
    if isinstance(t, type) and issubclass(t, enum.Enum):
        return click.Choice([str(m.value) for m in t]), False
    if t is bool:
        return None, True
    if t in (int, float, str):
        return t, False
    raise TypeError(f"no click type for {annotation!r}")


def _shown(default: Any) -> str | None:
    if default is None:
        return None
    if isinstance(default, bool):
        return "yes" if default else "no"
    if isinstance(default, enum.Enum):
        return str(default.value)
    if isinstance(default, tuple):
        return ", ".join(_shown(v) or "" for v in default) or None
    if isinstance(default, float) and default.is_integer():
        return f"{default:g}"
    return str(default)


def config_option(model: type[BaseModel], name: str, *decls: str, help: str | None = None,
                  off: str | None = None, **kw: Any) -> Callable[[Callable], Callable]:
    """``--name`` (underscores as dashes) for ``model.name``: its type, its choices (Literal
    or Enum), help (``help`` or the field's description) with the model's default in
    brackets.  Booleans become ``--name/--no-name`` (``off`` names the second flag).
    ``decls`` replace the flag names (the last plain word is the parameter name)."""
    field = model.model_fields[name]
    ctype, is_flag = _click_type(field.annotation)
    flag = "--" + name.replace("_", "-")
    if is_flag:
        decls = decls or (f"{flag}/{off or '--no-' + name.replace('_', '-')}",)
    else:
        decls = decls or (flag,)
    if not any(d.isidentifier() for d in decls):
        decls = (*decls, name)
    if typing.get_origin(_unwrap(field.annotation)) is tuple:
        kw.setdefault("multiple", True)  # repeatable; none given = the config's or model's
    text = (help or field.description or name.replace("_", " ")).rstrip(".")
    text = text[:1].upper() + text[1:]
    shown = _shown(field.get_default(call_default_factory=True))
    if kw.get("multiple"):
        text += " (repeatable)"
    if shown is not None and "[" not in text:
        text += f" [{shown}]"
    kw.setdefault("default", None)
    if not is_flag:
        kw.setdefault("type", ctype)
    return click.option(*decls, help=text + ".", **kw)


def config_options(model: type[BaseModel], *names: str, **helps: str) -> Callable[[Callable], Callable]:
    """Several :func:`config_option` at once, in order (``helps``: per-field help overrides)."""

    def apply(f: Callable) -> Callable:
        for n in reversed(names):
            f = config_option(model, n, help=helps.get(n))(f)
        return f

    return apply
