"""A sandbox's network policy as the cluster enforces it on the kubernetes tier: a NetworkPolicy of its pod.

The template's managed NetworkPolicy denies all egress; NetworkPolicies add up, so a sandbox granted a network
gets one more, selecting its pod alone (the label its claim puts on it), allowing what its policy allows:

- address rules (``203.0.113.0/24:443``) become ``ipBlock`` peers with their ports (TCP); a rule wider than a
  special block (``0.0.0.0/0``) does not open it (the block is an ``except``), as on the other tiers;
- ``"*"`` (and ``network="public"``) is every public address: IPv4 and IPv6 ``ipBlock``s with every special
  block excepted, plus DNS to the cluster's resolver (kube-dns in kube-system, port 53), since names are the
  point of it;
- deny rules of addresses become ``except`` entries of the allow blocks that contain them.

What a NetworkPolicy cannot say is refused, with the reason: names (``pypi.org``, ``*.example.com``: the
cluster sees addresses only), a deny of a name, and secrets (they need the host's TLS interception).
"""

from __future__ import annotations

import ipaddress
from typing import Any, Optional

from .._net.policy import NetworkPolicy, Rule, special_blocks

DNS_PEER = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}
EVERYWHERE = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))


def problem(policy: Optional[NetworkPolicy], secrets: Any) -> Optional[str]:
    """Why the cluster cannot enforce this (None: it can)."""
    if secrets:
        return ("secrets= need isolation='process' or 'gvisor': the kubernetes tier's egress is the cluster's "
                "NetworkPolicy, which cannot put a secret into a request (the host's TLS interception does)")
    if policy is None:
        return None
    names = [r.text for r in policy.allow + policy.deny if r.kind in ("name", "suffix")]
    if names:
        return (f"network rules {names}: the kubernetes tier's egress is the cluster's NetworkPolicy, which knows "
                "addresses, not names: allow addresses or CIDRs (203.0.113.0/24:443) or 'public', or use "
                "isolation='process' or 'gvisor' for rules by name")
    return None


def egress_rules(policy: NetworkPolicy) -> list[dict]:
    """The NetworkPolicy ``egress`` list for ``policy`` (its problem() is None)."""
    denied = [r.value for r in policy.deny if r.kind == "net"]
    rules: list[dict] = []
    for rule in policy.allow:
        cidrs = EVERYWHERE if rule.kind == "any" else (rule.value,)
        peers = [{"ipBlock": _block(cidr, denied)} for cidr in cidrs]
        rules.append(dict({"to": peers}, **_ports(rule)))
        if rule.kind == "any":
            rules.append({"to": [DNS_PEER], "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]})
    return rules


def network_policy(name: str, sandbox_label: tuple[str, str], policy: NetworkPolicy,
                   owner: Optional[dict] = None) -> dict:
    """The NetworkPolicy object: egress of the one pod that carries ``sandbox_label``, as ``policy`` allows."""
    metadata: dict = {"name": name, "labels": {"sandlot.dev/managed-by": "sandlot", sandbox_label[0]: sandbox_label[1]}}
    if owner is not None:  # deleted with its claim by the cluster's garbage collector
        metadata["ownerReferences"] = [owner]
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": metadata,
            "spec": {"podSelector": {"matchLabels": {sandbox_label[0]: sandbox_label[1]}}, "policyTypes": ["Egress"],
                     "egress": egress_rules(policy)}}


def _block(cidr: Any, denied: list) -> dict:
    """An ipBlock of ``cidr`` except the special blocks it is wider than and the denied networks inside it."""
    excepts = [b for b in special_blocks() if b.version == cidr.version and b != cidr and b.subnet_of(cidr)]
    excepts += [d for d in denied if d.version == cidr.version and d != cidr and d.subnet_of(cidr)]
    excepts = [e for e in excepts if not any(o != e and o.version == e.version and e.subnet_of(o) for o in excepts)]
    block: dict = {"cidr": str(cidr)}
    if excepts:
        block["except"] = sorted({str(e) for e in excepts})
    return block


def _ports(rule: Rule) -> dict:
    if rule.ports is None:
        return {}
    low, high = rule.ports
    port: dict = {"protocol": "TCP", "port": low}
    if high != low:
        port["endPort"] = high
    return {"ports": [port]}
