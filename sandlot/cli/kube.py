"""`sandlot kube manifests | image`: what Sandlot needs on a Kubernetes cluster (the kubernetes tier).

`manifests` prints YAML for `kubectl apply -f -` and talks to no cluster; `image` builds the sandboxes'
agent image with skopeo and umoci (no container daemon) and pushes it or writes it to a file.
"""

from __future__ import annotations

from typing import Optional

import click
from rich.markup import escape

from ._common import SandlotGroup, err

_TEMPLATE_HELP = ("A Sandlot template to offer (repeatable): a SandboxTemplate and a SandboxWarmPool each, with the "
                  "template's default limits as the pods' resources. NAME=REF: its pods run image REF instead of "
                  "--image (one with what that template holds, plus the agent). [default: python]")


@click.group(cls=SandlotGroup, short_help="Run on Kubernetes: print the manifests, build the agent image.")
def kube() -> None:
    """Sandlot on Kubernetes (agent-sandbox custom resources, pods under gVisor): `manifests` prints what to apply,
    `image` builds the image the sandboxes' pods run."""


@kube.command(short_help="Print the YAML to apply: templates, warm pools, RBAC, the server.")
@click.option("--namespace", "-n", default="sandlot", show_default=True, help="Namespace of everything Sandlot makes.")
@click.option("--image", required=True, metavar="REF",
              help="The sandboxes' image: Python and Sandlot's agent (`sandlot kube image` builds it).")
@click.option("--template", "templates", multiple=True, metavar="NAME[=REF]", help=_TEMPLATE_HELP)
@click.option("--warm", type=int, metavar="N",
              help="Pods each warm pool keeps ready. [default: the template's pool size, else SANDLOT_POOL_MIN (2)]")
@click.option("--server-image", metavar="REF",
              help="The server's image (Sandlot with the kubernetes and postgres extras). [default: --image]")
@click.option("--db", "db_url", metavar="URL",
              help="Also print the Secret sandlot-db holding this PostgreSQL URL (the output then holds its "
                   "password). Default: the Secret is expected to exist.")
@click.option("--no-runtime-class", is_flag=True,
              help="Leave out the RuntimeClass gvisor (the cluster has its own, as GKE Sandbox does).")
def manifests(namespace: str, image: str, templates: tuple[str, ...], warm: Optional[int],
              server_image: Optional[str], db_url: Optional[str], no_runtime_class: bool) -> None:
    """Print the manifests for `kubectl apply -f -`: the namespace, the RuntimeClass gvisor, a SandboxTemplate and a
    SandboxWarmPool per template, the server's ServiceAccount, Role (claims and templates only: no pods/exec, no
    secrets) and RoleBinding, its Deployment (2 replicas on one PostgreSQL) and Service.

    \b
      sandlot kube manifests --image registry.example/sandlot-agent:1 | kubectl apply -f -
    """
    from .. import _kube_manifests as km

    docs = km.manifests(namespace=namespace, image=image, templates=templates or ("python",), warm=warm,
                        server_image=server_image, db_url=db_url, runtime_class=not no_runtime_class)
    click.echo(km.render(docs, km.header(namespace, runtime_class=not no_runtime_class, db_secret=db_url is not None)),
               nl=False)


@kube.command(short_help="Build the sandboxes' image: a base with python3, plus Sandlot's agent.")
@click.option("--base", required=True, metavar="REF", help="An image with python3 (3.8 or newer) on its PATH.")
@click.option("--tag", required=True, metavar="REF", help="The new image's reference (where --push puts it).")
@click.option("--push", is_flag=True, help="Push it to --tag's registry.")
@click.option("--output", "-o", metavar="FILE", type=click.Path(dir_okay=False),
              help="Write it as an OCI archive (`skopeo copy oci-archive:FILE ...`, `ctr images import`).")
@click.option("--insecure", is_flag=True, help="Plain HTTP / no TLS verification (a registry on loopback).")
def image(base: str, tag: str, push: bool, output: Optional[str], insecure: bool) -> None:
    """Build the image the sandboxes' pods run: --base (any image with python3) plus Sandlot's agent at
    /opt/sandlot/_agent (stdlib only), user 1000, workdir /home/user. skopeo and umoci do the work: no container
    daemon, nothing from the base runs on this machine.

    \b
      sandlot kube image --base python:3.12-slim --tag registry.example/sandlot-agent:1 --push
    """
    from .. import _kube_image

    if not push and not output:
        raise click.UsageError("nowhere to put the image: give --push, --output FILE, or both")
    result = _kube_image.build(base, tag, push=push, output=output, tls_verify=not insecure,
                               progress=lambda message: err.print(escape(message)))
    click.echo(result["digest"])
