"""Command-line flags generated from a config dataclass: one `--kebab-case` flag per field, with the
field's `metadata["help"]` and its default shown in `--help`. Booleans get `--flag/--no-flag`, and
a shorter way to say no when `metadata["off_flag"]` names one."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing

from minimind.model.config import ModelConfig


def option(text: str, off_flag: str | None = None, **field_kwargs):
    """A config field with its `--help` text (and a shorter way to say no, for a bool): `default=` or
    `default_factory=` as for `dataclasses.field`."""
    return dataclasses.field(metadata={"help": text, **({"off_flag": off_flag} if off_flag else {})}, **field_kwargs)


def _flag_type(annotation):
    """int, float, str, bool or `X | None` -> the argparse type (None for bool)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        (annotation,) = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    return None if annotation is bool else annotation


def _help(config_class, name: str) -> str:
    """A field's help text; a subclass that only changes a default inherits its parent's help."""
    for klass in config_class.__mro__:
        for field in dataclasses.fields(klass) if dataclasses.is_dataclass(klass) else ():
            if field.name == name and field.metadata.get("help"):
                return field.metadata["help"]
    return ""


def add_flags(parser: argparse.ArgumentParser, config_class) -> None:
    hints = typing.get_type_hints(config_class)
    for field in dataclasses.fields(config_class):
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        flag_type = _flag_type(hints[field.name])
        options = dict(default=default, help=_help(config_class, field.name) + " (default: %(default)s)", dest=field.name)
        flag = "--" + field.name.replace("_", "-")
        if flag_type is None:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **options)
            if off := field.metadata.get("off_flag"):  # e.g. --cpu for --no-use-gpu
                parser.add_argument(off, action="store_false", dest=field.name, help=f"same as --no-{flag[2:]}")
        else:
            parser.add_argument(flag, type=flag_type, **options)


def parse_config(config_class, argv: list[str] | None = None, description: str | None = None):
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(parser, config_class)
    return config_class(**vars(parser.parse_args(argv)))


def parse_overrides(text: str | None) -> dict:
    """"num_experts=4,num_experts_per_tok=1" -> {"num_experts": 4, "num_experts_per_tok": 1}, typed by ModelConfig."""
    if not text:
        return {}
    types = typing.get_type_hints(ModelConfig)
    known = {field.name for field in dataclasses.fields(ModelConfig)}
    overrides = {}
    for item in text.split(","):
        key, _, value = (part.strip() for part in item.partition("="))
        if key not in known or not value:
            raise SystemExit(
                f"--config-overrides: {item!r} is not FIELD=VALUE with a field of ModelConfig ({', '.join(sorted(known))})"
            )
        kind = types[key]
        if kind in (bool, bool | None):
            if value.lower() not in ("true", "false", "1", "0"):
                raise SystemExit(f"--config-overrides: {key} is true or false, not {value!r}")
            overrides[key] = value.lower() in ("true", "1")
        else:
            overrides[key] = float(value) if kind is float else int(value) if kind is int else value
    return overrides
