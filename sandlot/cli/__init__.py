"""The `sandlot` command line (click + rich). One module per job; this one only assembles them.

Exit codes: 0 ok, 1 the code or check failed, 2 usage error, 3 Sandlot failed; `exec` returns the
command's own. Human output by default, `--json` for scripts.
"""

from __future__ import annotations

import click

from ._common import SandlotGroup
from .cp import cp
from .doctor import doctor
from .kube import kube
from .mounts import volume
from .remote import fork, kill, ls
from .run import exec_, run
from .service import keys, mcp, serve
from .shell import shell
from .template import template


@click.group(cls=SandlotGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sandlot")
def main() -> None:
    """Sandlot: self-hosted sandboxes for code written by AI agents."""


for command in (run, shell, exec_, ls, kill, fork, cp, volume, template, serve, keys, mcp, kube, doctor):
    main.add_command(command)

__all__ = ["main"]
