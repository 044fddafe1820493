"""How a server setting is declared: one dataclass field, from which the rest derive.

A field of :class:`~visionserve.server.settings.ServerSettings` declared with
:func:`setting` carries a :class:`Setting` in its metadata. From the field (name, type,
default) and that metadata come: the environment variable ``VISIONSERVE_<NAME>``, the
``visionserve serve`` option (``--<name>`` with dashes unless declared; its type from the
field's type; its help with the default rendered from the field's default; see
``visionserve/commands/_settings_cli.py``) and README's table of settings. Text from the
environment and from the command line is parsed by :func:`parse_text`, the same way.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any

ENV_PREFIX = "VISIONSERVE_"


@dataclass(frozen=True)
class Setting:
    """What a field needs beyond its name, type and default to be an option and a variable.

    ``flag``: the option when it is not ``--<name>`` (``--no-<name>`` for a bool that
    defaults to True). ``env``: False when the setting has no environment variable.
    ``scale``: the option's value times this is the setting's (``--max-message-mb``);
    ``from_flag``: turns the option's text into the setting's value instead
    (``--auth-token-file`` reads the token). ``env_note``: what the variable holds where it
    differs from the option. ``unset``: what an unset (None or empty) default means.
    ``platform``: a platform's variable read when ``VISIONSERVE_<NAME>`` is unset.
    ``repeat``: the option may be given several times, each adding one item.
    """

    help: str
    flag: str = ""
    env: bool = True
    group: str = ""
    choices: tuple[str, ...] = ()
    metavar: str | None = None
    scale: int = 1
    from_flag: Callable[[str], Any] | None = None
    env_note: str = ""
    unset: str = "unset"
    platform: str = ""
    repeat: bool = False


def setting(default: Any = MISSING, *, repr: bool = True, **spec: Any) -> Any:
    """A dataclass field that is a server setting (``spec``: :class:`Setting`'s fields)."""
    return dataclasses.field(default=default, repr=repr, metadata={"setting": Setting(**spec)})


@dataclass(frozen=True)
class Declared:
    """One declared setting: its field's name, value type and default, and its metadata."""

    name: str
    kind: Any  # int, float, str, bool, Path or tuple[str, ...] (None stripped)
    default: Any  # dataclasses.MISSING when required
    spec: Setting

    @property
    def required(self) -> bool:
        return self.default is MISSING

    @property
    def env(self) -> str | None:
        return ENV_PREFIX + self.name.upper() if self.spec.env else None

    @property
    def flag(self) -> str:
        if self.spec.flag:
            return self.spec.flag
        negative = self.kind is bool and self.default is True
        return ("--no-" if negative else "--") + self.name.replace("_", "-")

    def default_text(self) -> str:
        """The default as the option's help and README show it (in the option's units)."""
        if self.required:
            return "required"
        if self.default is None or self.default == ():
            return self.spec.unset
        if self.kind is bool:
            return f"{self.name} {'on' if self.default else 'off'}"
        value = self.default / self.spec.scale if self.spec.scale != 1 else self.default
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        return str(value)


def declarations(cls: type) -> list[Declared]:
    """Every field of ``cls`` declared with :func:`setting`, in field order."""
    hints = typing.get_type_hints(cls)
    found = []
    for item in dataclasses.fields(cls):
        if "setting" in item.metadata:
            kind = _strip_none(hints[item.name])
            found.append(Declared(item.name, kind, item.default, item.metadata["setting"]))
    return found


def _strip_none(kind: Any) -> Any:
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        (kind,) = [arg for arg in typing.get_args(kind) if arg is not type(None)]
    return kind


def comma_list(value: str) -> tuple[str, ...]:
    """``a,b, c`` -> ``("a", "b", "c")``."""
    return tuple(item.strip() for item in value.split(",") if item.strip())


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
_EXPECTED = {int: "an integer", float: "a number", bool: f"one of {_TRUE + _FALSE}"}


def parse_text(kind: Any, raw: str) -> Any:
    """``raw`` (an environment variable's or an option's text) as a value of ``kind``.

    ``ValueError`` says what was expected, e.g. "expected an integer, got 'eighty'".
    """
    try:
        if kind is bool:
            word = raw.strip().lower()
            if word not in _TRUE + _FALSE:
                raise ValueError(word)
            return word in _TRUE
        if kind in (int, float):
            return kind(raw)
    except ValueError:
        raise ValueError(f"expected {_EXPECTED[kind]}, got {raw!r}") from None
    if kind is Path:
        return Path(raw)
    if typing.get_origin(kind) is tuple:
        return comma_list(raw)
    return raw
