"""``kubeinfer-serve``'s argument parser, generated from the settings table (:mod:`kubeinfer_serving.config`).

No prefix matching (``allow_abbrev=False``): ``--api-keys sk-...`` is an unknown flag, never a
shortened ``--api-keys-file``. Error messages name unknown flags but never echo their values
(which can be secrets), and an invalid secret is reported without its value.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kubeinfer_serving import __version__
from kubeinfer_serving.config import ENV_PREFIX, ServerSettings, flag_names, meta

_DESCRIPTION = ("OpenAI-compatible serving pod. With no model flags it serves the default catalogue "
                "(smollm2-135m-instruct + tiny-llama + all-minilm-l6-v2). Every flag can also be set as "
                f"{ENV_PREFIX}<FLAG> (e.g. {ENV_PREFIX}PORT); a flag wins over the variable.")


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose "unrecognized arguments" error lists flag names only."""

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> argparse.Namespace:  # noqa: ANN401
        """As argparse's, but unknown arguments are reported by flag name (``--x=VALUE`` as ``--x``)."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            flags = [e.split("=", 1)[0] for e in extras if e.startswith("-")]
            what = f"unrecognized flags: {' '.join(flags)}" if flags else f"{len(extras)} unexpected values"
            self.error(what + " (values not shown; see --help)")
        return parsed


def _plain(annotation: Any) -> tuple[Any, bool]:  # noqa: ANN401
    """(the annotation without ``| None``, whether it was optional)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], True
    return annotation, False


def _add(parser: argparse.ArgumentParser, name: str) -> None:
    field = ServerSettings.model_fields[name]
    m = meta(name)
    kind, _ = _plain(field.annotation)
    kwargs: dict[str, Any] = {"dest": name, "help": field.description, "default": None}
    if m["metavar"]:
        kwargs["metavar"] = m["metavar"]
    origin = typing.get_origin(kind)
    if kind is bool:
        kwargs["action"] = argparse.BooleanOptionalAction if m["negatable"] else "store_true"
    elif origin is typing.Literal:
        kwargs["choices"] = list(typing.get_args(kind))
    elif origin is list:
        kwargs["nargs"] = "+"
    elif kind in (int, float, Path):
        kwargs["type"] = kind
    parser.add_argument(*flag_names(name), **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The ``kubeinfer-serve`` parser: one flag per settings field (plus its aliases) and ``--version``;
    every flag defaults to None (= the variable, else the default)."""
    p = _Parser(prog="kubeinfer-serve", description=_DESCRIPTION, allow_abbrev=False)
    p.add_argument("--version", action="version", version=f"kubeinfer-serve {__version__}")
    for name in ServerSettings.model_fields:
        _add(p, name)
    return p


def parse_settings(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> ServerSettings:
    """Settings from ``argv`` (default ``sys.argv[1:]``) and ``env`` (default ``os.environ``).

    Raises:
        SystemExit: invalid flags or values (argparse prints the usage and the reason, exit code 2).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return ServerSettings.from_sources(vars(args), env)
    except ValueError as exc:
        parser.error(str(exc))
