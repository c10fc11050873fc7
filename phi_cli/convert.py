"""`phi convert`: bring an old Phi checkpoint to the current layout, safely."""

from __future__ import annotations

from typing import Annotated, Literal

import typer

from phi_cli.io import progress
from phi_cli.options import QuietOpt, RevisionOpt, silence_notices
from phi_core.convert import KEEP, convert_checkpoint, parse_size
from phi_core.precision import FLOAT_DTYPES


def convert_command(
    source: Annotated[str, typer.Argument(help="Checkpoint folder or Hub repo id (any Phi layout).")],
    output: Annotated[str, typer.Argument(help="Folder to write; created only once complete.")],
    revision: RevisionOpt = None,
    dtype: Annotated[Literal[(KEEP, *FLOAT_DTYPES)], typer.Option(help="Dtype of the saved tensors.")] = KEEP,
    max_shard_size: Annotated[
        str | None, typer.Option(help="Split into shards of at most this size (e.g. 2GB), with an index.")
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace OUTPUT if it exists.")] = False,
    verify: Annotated[
        bool, typer.Option(help="Load the result and compare its logits with the source weights'.")
    ] = False,
    quiet: QuietOpt = False,
) -> None:
    """Convert a mixformer-sequential, phi-msft or transformers 4.36 checkpoint to the current layout.

    phi convert ./phi-1_5-old ./phi-1_5 --verify

    phi convert microsoft/phi-2 ./phi-2 --revision 834565c23f9b28b96ccbeabe614dd906b6db551a --dtype float16
    """
    silence_notices(quiet)
    shard_size = parse_size(max_shard_size) if max_shard_size is not None else None
    with progress("converting", enabled=not quiet, unit="bytes") as update:
        report = convert_checkpoint(
            source,
            output,
            dtype,
            shard_size,
            force,
            verify,
            revision,
            lambda name, size: update(size, f"converting {name}"),
        )
    shards = f"{report.shards} shards" if report.shards > 1 else "1 file"
    typer.echo(
        f"converted {report.layout} checkpoint: {report.tensors} tensors, {report.bytes_written / 1e6:.1f} MB "
        f"in {shards} -> {output}"
    )
    if report.max_abs_diff is not None:
        typer.echo(f"verify: max |logit difference| vs the source weights = {report.max_abs_diff:.3g}")
