"""The `phi` command: thin Typer front ends over phi_core."""
