"""``visionserve serve``'s options and README's settings table, derived from the settings.

Every field of :class:`~visionserve.server.settings.ServerSettings` declared with
``setting(...)`` is one option: its flag, type, choices, group and help (with the default
rendered from the field's default, and the environment variable named) come from that
declaration, and :func:`overrides` maps the parsed options back to setting names. Nothing
here names a setting.
"""

from __future__ import annotations

import argparse
from typing import Any

from visionserve.server.settings import SETTINGS
from visionserve.server.settings_spec import Declared, parse_text


def add_setting_options(parser: argparse.ArgumentParser) -> dict[str, Any]:
    """One option per declared setting; returns the option groups by title ("" = none)."""
    groups: dict[str, Any] = {"": parser}
    for declared in SETTINGS:
        title = declared.spec.group
        if title not in groups:
            groups[title] = parser.add_argument_group(title)
        groups[title].add_argument(
            declared.flag,
            dest=declared.name,
            help=help_text(declared).replace("%", "%%"),
            **_parsing(declared),
        )
    return groups


def _parsing(declared: Declared) -> dict[str, Any]:
    spec = declared.spec
    if declared.kind is bool:
        return {"action": "store_const", "const": not declared.default}
    if spec.repeat or spec.from_flag is not None:
        kind: Any = str  # each item / the text from_flag reads
    else:
        kind = float if spec.scale != 1 else declared.kind
    options: dict[str, Any] = {"type": _option_type(kind)}
    if spec.repeat:
        options["action"] = "append"
    if spec.choices:
        options["choices"] = spec.choices
    else:  # argparse's own, from the flag (--max-message-mb MAX_MESSAGE_MB), unless declared
        options["metavar"] = spec.metavar or declared.flag[2:].replace("-", "_").upper()
    return options


def _option_type(kind: Any) -> Any:
    def parse(text: str) -> Any:
        try:
            return parse_text(kind, text)
        except ValueError as exc:  # argparse: "argument --port: expected an integer, ..."
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def help_text(declared: Declared) -> str:
    """The option's help: what it does, its default, its environment variable."""
    default = declared.default_text()
    default = default if declared.required else f"default: {default}"
    return f"{declared.spec.help} ({default}; {_variables(declared, quote='')})"


def _variables(declared: Declared, quote: str) -> str:
    if not declared.env:
        return "no environment variable"
    text = f"env {quote}{declared.env}{quote}"
    if declared.spec.env_note:
        text += f", {declared.spec.env_note}"
    if declared.spec.platform:
        text += f"; then {quote}{declared.spec.platform}{quote}"
    return text


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The options given (unset ones left out), as setting name -> value."""
    values = {}
    for declared in SETTINGS:
        value = getattr(args, declared.name, None)
        if value is None:
            continue
        spec = declared.spec
        if spec.repeat:
            value = tuple(value)
        elif spec.from_flag is not None:
            value = spec.from_flag(value)
        elif spec.scale != 1:
            value = declared.kind(value * spec.scale)
        values[declared.name] = value
    return values


def settings_table() -> str:
    """README's table of server settings (Markdown), in ``--help``'s order."""
    order = list(dict.fromkeys(d.spec.group for d in SETTINGS))
    rows = ["| option | environment variable | default | meaning |", "|---|---|---|---|"]
    for declared in sorted(SETTINGS, key=lambda d: order.index(d.spec.group)):
        cells = (
            f"`{declared.flag}`",
            _variables(declared, quote="`").removeprefix("env "),
            declared.default_text(),
            declared.spec.help,
        )
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows) + "\n"
