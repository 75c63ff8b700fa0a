"""`python -m sandlot.cli`, the same as the `sandlot` script."""

from . import main

main(prog_name="sandlot")
