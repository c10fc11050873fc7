"""The `phi` command line: one subcommand per job, each a thin front end over one phi_core function."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Annotated

import typer

from phi_cli.bench import bench_command
from phi_cli.chat import chat_command
from phi_cli.classify import classify_command, tag_command
from phi_cli.convert import convert_command
from phi_cli.errors import PhiGroup
from phi_cli.generate import generate_command
from phi_cli.serve import serve_command

app = typer.Typer(
    cls=PhiGroup,
    name="phi",
    help="Run, convert and benchmark Microsoft's Phi language models (Phi-1, Phi-1.5, Phi-2).",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish, powershell
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def print_version(value: bool) -> None:
    if value:
        typer.echo(f"phi-toolkit {installed_version()}")
        raise typer.Exit()


def installed_version() -> str:
    """The version pip installed (pyproject.toml's), or "unknown" when running from a bare checkout."""
    try:
        return version("phi-toolkit")
    except PackageNotFoundError:
        return "unknown"


@app.callback()
def root(
    show_version: Annotated[
        bool, typer.Option("--version", is_eager=True, callback=print_version, help="Print the version and exit.")
    ] = False,
) -> None:
    """Run, convert and benchmark Microsoft's Phi language models (Phi-1, Phi-1.5, Phi-2)."""


app.command("generate")(generate_command)
app.command("classify")(classify_command)
app.command("tag")(tag_command)
app.command("convert")(convert_command)
app.command("bench")(bench_command)
app.command("serve")(serve_command)
app.command("chat")(chat_command)
