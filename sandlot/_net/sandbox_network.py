"""One sandbox's network, from its spec: the namespace configured, the broker serving it, the secrets' CA.

``SandboxNetwork.plan(policy, secrets)`` is what a create asks for (validated data, no side effect);
``await network.attach(pid)`` configures the sandbox's namespace (netns.py), opens the broker's sockets in
it and starts the broker (broker.py) with the DNS responder and, when there are secrets, the interceptor
that substitutes them (intercept.py) under a CA made for this sandbox alone (tls.py).

A secret grants its own hosts on port 443 (the only place its value can go): the effective policy is the
owner's policy plus ``host:443`` for each secret host, shown as such by ``policy_json()``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Optional

from .._exceptions import InvalidRequest
from .policy import NetworkPolicy

CA_BUNDLE_PATH = "/home/user/.config/sandlot/ca-bundle.pem"  # inside the sandbox: the roots its clients trust


class SandboxNetwork:
    def __init__(self, policy: Optional[NetworkPolicy], secrets: Any = None) -> None:
        self.asked = policy
        self.secrets = secrets
        self.broker: Any = None
        self._listeners: Any = None
        self._ca: Any = None
        self.attached_in: Optional[float] = None  # seconds attach() took

    @classmethod
    def plan(cls, policy: Optional[NetworkPolicy], secrets: Any = None) -> Optional["SandboxNetwork"]:
        """None when the sandbox gets no network at all (the default)."""
        if policy is None and not secrets:
            return None
        return cls(policy, secrets)

    # -- what the sandbox is told ----------------------------------------------------------------------
    def _base(self) -> NetworkPolicy:
        """The owner's policy, or one that allows nothing (a sandbox given only secrets)."""
        return self.asked if self.asked is not None else NetworkPolicy()

    def effective_policy(self) -> NetworkPolicy:
        base = self._base()
        if not self.secrets:
            return base
        extra = [f"{host}:443" for host in self.secrets.hosts]
        return base.updated(allow=[rule.text for rule in base.allow] + extra)

    def env(self) -> dict[str, str]:
        """What the sandbox's environment gains: each secret's placeholder, and the CA bundle's path in the
        variables clients read (only with secrets: without them TLS is never terminated)."""
        if not self.secrets:
            return {}
        from .tls import ca_env

        return dict(self.secrets.placeholders(), **ca_env(CA_BUNDLE_PATH))

    def ca_bundle(self) -> Optional[bytes]:
        """The PEM the sandbox must trust (host roots + this sandbox's CA), when there are secrets."""
        if not self.secrets:
            return None
        return self._sandbox_ca().bundle_pem()

    def _sandbox_ca(self) -> Any:
        """This sandbox's CA, made once (only a sandbox with secrets has one)."""
        from .tls import SandboxCA

        self._ca = self._ca or SandboxCA.create(self.secrets.hosts)
        return self._ca

    # -- serving it --------------------------------------------------------------------------------------
    async def attach(self, pid: int) -> None:
        """Configure the namespace of ``pid`` (the sandbox's pid 1) and start serving it."""
        from . import netns
        from .broker import Broker
        from .dns import upstream_from_env
        from .log import DecisionLog

        started = time.monotonic()
        upstream = upstream_from_env()
        await asyncio.to_thread(netns.configure, pid)
        self._listeners = await asyncio.to_thread(netns.open_listeners, pid)
        interceptor = None
        if self.secrets:
            from .intercept import SecretsInterceptor

            interceptor = SecretsInterceptor(self.secrets, self._sandbox_ca())
        self.broker = Broker(self.effective_policy(), DecisionLog(), upstream, interceptor=interceptor)
        await self.broker.start(self._listeners)
        self.attached_in = time.monotonic() - started

    def update(self, allow: Optional[list] = None, deny: Optional[list] = None) -> dict:
        """Replace the allow and/or deny rules, live: connections no longer allowed are cut. Returns the
        owner's policy as JSON (the secrets' hosts stay granted on top)."""
        if allow is None and deny is None:
            raise InvalidRequest("network.update() needs allow=, deny= or both")
        self.asked = self._base().updated(allow=allow, deny=deny)
        if self.broker is not None:
            self.broker.update(self.effective_policy())
        return self.policy_json()

    def policy_json(self) -> Any:
        return self.asked.to_json() if self.asked is not None else None

    def log(self, since: Optional[float] = None) -> list[dict]:
        """The broker's decisions (time, kind, name, address, port, verdict, rule, reason), oldest first."""
        if self.broker is None:
            return []
        return [dict(entry) for entry in self.broker.log.entries(since)]

    def stats(self) -> dict:
        return self.broker.stats() if self.broker is not None else {}

    async def close(self) -> None:
        broker, self.broker = self.broker, None
        if broker is not None:
            await broker.close()
        if self._listeners is not None:
            self._listeners.close()
            self._listeners = None
