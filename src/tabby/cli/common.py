"""What every tabbyctl command group shares: the --datastore option and one-line errors."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

import typer
from rich.console import Console

from tabby.datastore import Datastore, DatastoreError, open_datastore
from tabby.model import ValidationError

DEFAULT_DATASTORE = "sqlite:///run/tabby/demo/store.db"  # the demo lab's store

DatastoreOpt = typer.Option(
    DEFAULT_DATASTORE,
    "--datastore",
    envvar="TABBY_DATASTORE",
    help="datastore URL (sqlite:///abs/path.db, etcd://HOST:PORT, etcd+unix:///path)",
)

err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def fail(message: str) -> NoReturn:
    """Print one red line on stderr and exit 1."""
    err_console.print(f"error: {message}", style="red", markup=False)
    raise typer.Exit(1)


def warn(message: str) -> None:
    err_console.print(f"warning: {message}", style="yellow", markup=False)


@contextmanager
def one_line_errors() -> Iterator[None]:
    """Datastore and validation errors end the command with one line, not a traceback."""
    try:
        yield
    except (DatastoreError, ValidationError) as err:
        fail(str(err))


def open_store(url: str) -> Datastore:
    """The datastore at ``url``, or a one-line error and exit 1."""
    with one_line_errors():
        return open_datastore(url)
    raise AssertionError("unreachable")  # for type checkers: fail() never returns
