"""Flags several subcommands share: folders, and the run-config flags derived from ``RunConfig``."""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, get_args, get_origin

from pydantic import TypeAdapter, ValidationError

from shared.runconfig import RunConfig, run_config_defaults

__all__ = ["add_data_dir", "add_run_config_args", "run_config_from_args", "float_tuple"]

_TITLES = {"model": "network", "data": "preprocessing and sampling", "train": "optimiser", "federation": "federation"}


def float_tuple(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def add_data_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="data", help="folder holding one sub-folder per site (Decathlon layout)")
    parser.add_argument(
        "--sites",
        type=lambda s: [v for v in s.split(",") if v],
        default=None,
        help="comma-separated site folder names (default: every site under --data)",
    )


def _flag_type(name: str):
    """Parse and check one flag on its own with the field's own type and bounds."""
    info = RunConfig.model_fields[name]
    adapter = TypeAdapter(Annotated[info.annotation, *info.metadata] if info.metadata else info.annotation)

    def parse(text: str) -> Any:
        try:
            return adapter.validate_python(text)
        except ValidationError as exc:
            raise argparse.ArgumentTypeError(exc.errors()[0]["msg"].removeprefix("Value error, ")) from None

    parse.__name__ = info.alias  # argparse names the flag's type in its error message
    return parse


def _choices(annotation: Any) -> tuple | None:
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    args = get_args(annotation)
    return args if args and all(isinstance(a, str) for a in args) else None


def add_run_config_args(
    parser: argparse.ArgumentParser, groups: Iterable[str], defaults: Mapping[str, Any] | None = None
) -> None:
    """One ``--<key>`` flag per ``RunConfig`` field of the given CLI groups.

    Unset flags stay out of the namespace, so only what the user typed overrides the run config;
    ``defaults`` (kebab-case) only changes the help text, for commands with their own presets.
    """
    shown = {**run_config_defaults(), **(defaults or {})}
    for group in groups:
        g = parser.add_argument_group(_TITLES[group])
        for name, info in RunConfig.model_fields.items():
            extra = info.json_schema_extra or {}
            if extra.get("cli") != group:
                continue
            flags = [f"--{info.alias}", *extra.get("flags", [])]
            # argparse %-formats help strings: a literal "%" in a description must be doubled
            help_text = f"{info.description} (default: {shown[info.alias]})".replace("%", "%%")
            if info.annotation is bool:
                g.add_argument(
                    *flags, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text
                )
            elif choices := _choices(info.annotation):
                g.add_argument(
                    *flags, dest=name, type=str.lower, choices=choices, default=argparse.SUPPRESS, help=help_text
                )
            else:
                g.add_argument(*flags, dest=name, type=_flag_type(name), default=argparse.SUPPRESS, help=help_text)


def run_config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The run-config keys the user set on the command line (kebab-case), typed."""
    return {
        info.alias: getattr(args, name)
        for name, info in RunConfig.model_fields.items()
        if info.json_schema_extra and hasattr(args, name)
    }
