"""The backend registry: isolation tier names -> backends, kept apart from the interface (base.py).

A factory over the tiers, as jupyter_client keeps its provisioner factory apart from the
provisioner interface: the interface imports no tier, the tiers import the interface and the shared
code (_common.py), and only this module imports the tiers (when a backend is first asked for, so
``import sandlot`` stays cheap).
"""

from __future__ import annotations

from typing import Optional

from .. import _config
from .._exceptions import InvalidRequest
from .base import Backend

__all__ = ["ISOLATIONS", "backend_class", "default_isolation", "supports", "isolations_with"]

ISOLATIONS = ("process", "gvisor", "kubernetes")


def default_isolation(isolation: Optional[str] = None) -> str:
    """The tier a sandbox asked for, else ``$SANDLOT_ISOLATION`` (a host that wants gVisor for
    everything sets it once), else the process tier."""
    return isolation or _config.isolation() or "process"


def _classes() -> dict[str, type[Backend]]:
    from .gvisor import GVisorBackend
    from .kubernetes import KubernetesBackend
    from .process import ProcessBackend

    return {"process": ProcessBackend, "gvisor": GVisorBackend, "kubernetes": KubernetesBackend}


def backend_class(isolation: str) -> type[Backend]:
    """The backend of a tier, unmade (its capabilities are class data: asking makes no sandbox)."""
    cls = _classes().get(isolation) if isinstance(isolation, str) else None
    if cls is None:
        raise InvalidRequest(f"unknown isolation {isolation!r}; available: {list(ISOLATIONS)}")
    return cls


def isolations_with(capability: str) -> list[str]:
    """The tiers that declare ``capability`` (a field of ``Capabilities``), in registry order."""
    return [name for name in ISOLATIONS if getattr(backend_class(name).capabilities, capability)]


def supports(isolation: str, capability: str) -> bool:
    """Whether the tier ``isolation`` declares ``capability``; False for an unknown tier."""
    try:
        return bool(getattr(backend_class(isolation).capabilities, capability))
    except InvalidRequest:
        return False
