"""`python -m blobplane`: the `blobplane` command."""

from blobplane.cli.main import main

main(prog_name="blobplane")
