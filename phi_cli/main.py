"""The `phi` command line: one subcommand per job, each a thin front end over one phi_core function."""

from __future__ import annotations

import typer

from phi_cli.bench import bench_command
from phi_cli.classify import classify_command, tag_command
from phi_cli.convert import convert_command
from phi_cli.errors import PhiGroup
from phi_cli.generate import generate_command

app = typer.Typer(
    cls=PhiGroup,
    name="phi",
    help="Run, convert and benchmark Microsoft's Phi language models (Phi-1, Phi-1.5, Phi-2).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command("generate")(generate_command)
app.command("classify")(classify_command)
app.command("tag")(tag_command)
app.command("convert")(convert_command)
app.command("bench")(bench_command)
