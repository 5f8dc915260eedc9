"""Shared command-line plumbing: one clear error line and a non-zero exit, no traceback."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from tracekit.schema import TracekitError, notes

if TYPE_CHECKING:
    from rich.console import Console

F = TypeVar("F", bound=Callable[..., Any])


def __getattr__(name: str) -> Console:
    """`console` and `err_console` (rich Consoles, stdout and stderr), made at first use:
    importing rich costs 30 ms that a command printing no table (`twin run --json`)
    need not pay."""
    if name not in ("console", "err_console"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from rich.console import Console

    made = globals()[name] = Console(stderr=name == "err_console")
    return made


class _NoteHandler(logging.Handler):
    """Prints each distinct note once, as `note: ...` on stderr."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seen: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if msg not in self.seen:
            self.seen.add(msg)
            click.echo(f"note: {msg}", err=True)


def fail(message: str) -> None:
    """The one way a command stops on bad input: `error: ...` on stderr, exit code 2."""
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


def user_errors(fn: F) -> F:
    """Turn TracekitError (and unreadable files) into `error: ...` and exit code 2;
    print tracekit.schema's notes (input taken as meant, e.g. sorted) as `note: ...`."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        handler = _NoteHandler()
        notes.addHandler(handler)
        notes.setLevel(logging.INFO)
        try:
            return fn(*args, **kwargs)
        except TracekitError as e:
            fail(str(e))
        finally:
            notes.removeHandler(handler)

    return wrapper  # type: ignore[return-value]


def parse_csv_floats(value: str, flag: str) -> list[float]:
    try:
        out = [float(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise TracekitError(f"{flag}: expected comma-separated numbers, got {value!r}") from None
    if not out:
        raise TracekitError(f"{flag}: expected at least one number")
    return out


def parse_csv_ints(value: str, flag: str) -> list[int]:
    try:
        out = [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise TracekitError(f"{flag}: expected comma-separated integers, got {value!r}") from None
    if not out:
        raise TracekitError(f"{flag}: expected at least one integer")
    return out


class LazyGroup(click.Group):
    """A click group whose subcommands live in modules imported only when used,
    so `--help` and quick commands start fast and packages stay decoupled.

    `lazy` maps a command name to "module:attribute" of a click command."""

    def __init__(self, *args: Any, lazy: dict[str, str] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self.lazy))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy:
            import importlib

            module, attr = self.lazy[cmd_name].split(":")
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, cmd_name)


def renamed(old: str, new: str, param: str | None = None, **option: Any) -> Callable[[F], F]:
    """Keep an option's old name `old` working, hidden, for one version: its value goes
    to the option now called `new` (parameter `param`, default from the name; both
    given: an error), with a note naming the new name. Place it under the command's
    click options and over `user_errors`."""
    dest = "renamed_" + old.lstrip("-").replace("-", "_")
    target = param or new.lstrip("-").replace("-", "_")

    def deco(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            value = kwargs.pop(dest, None)
            if value is not None and value is not False:
                if kwargs.get(target) not in (None, False):
                    fail(f"{old} is the old name of {new}: give {new} only")
                click.echo(f"note: {old} is now {new} (the old name goes in the next version)", err=True)
                kwargs[target] = value
            return fn(*args, **kwargs)

        kw = {"default": None, **option}
        return click.option(old, dest, hidden=True, **kw)(wrapper)  # type: ignore[return-value]

    return deco
