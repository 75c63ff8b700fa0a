"""``sandlot.volumes``: named, persistent volumes, mounted into sandboxes with ``mounts={"/cache": "vol:NAME"}``.

Local (this host's SDK, the "local" scope) unless a server is meant (``api_url=`` or SANDLOT_API_URL): then
the volumes are your tenant's on that server. ``AsyncVolumes`` is the one implementation; ``Volumes`` is its
sync facade, and ``sandlot.volumes`` a ``Volumes()`` that follows the environment.
"""

from __future__ import annotations

from typing import Any, Optional

from ._models import VolumeInfo


class AsyncVolumes:
    """Create, list, inspect and delete named volumes."""

    def __init__(self, api_url: Optional[str] = None, api_key: Optional[str] = None) -> None:
        self._api_url, self._api_key = api_url, api_key

    def _transport(self):
        from ._sandbox import transport_for

        return transport_for(self._api_url, self._api_key)

    async def create(self, name: str, size: Any = "1G", *, inodes: Optional[int] = None) -> VolumeInfo:
        """A new empty volume: ``size`` bytes ("2G" accepted) enforced by the kernel (a full volume is ENOSPC
        to the code), ``inodes`` files at most (default one per 16 KiB). InvalidRequest if the name is taken."""
        return await self._transport().create_volume(name, size, inodes)

    async def list(self) -> "list[VolumeInfo]":
        return await self._transport().list_volumes()

    async def info(self, name: str) -> VolumeInfo:
        """One volume (InvalidRequest if there is none of that name)."""
        return await self._transport().volume_info(name)

    async def delete(self, name: str) -> None:
        """Remove a volume and its files; InvalidRequest while a sandbox has it mounted."""
        await self._transport().delete_volume(name)


class Volumes:
    """The sync face of :class:`AsyncVolumes` (``sandlot.volumes``)."""

    def __init__(self, api_url: Optional[str] = None, api_key: Optional[str] = None) -> None:
        self._async = AsyncVolumes(api_url, api_key)

    def create(self, name: str, size: Any = "1G", *, inodes: Optional[int] = None) -> VolumeInfo:
        """A new empty volume: ``size`` bytes ("2G" accepted) enforced by the kernel (a full volume is ENOSPC
        to the code), ``inodes`` files at most (default one per 16 KiB). InvalidRequest if the name is taken."""
        from ._sync import run_sync

        return run_sync(self._async.create(name, size, inodes=inodes))

    def list(self) -> "list[VolumeInfo]":
        from ._sync import run_sync

        return run_sync(self._async.list())

    def info(self, name: str) -> VolumeInfo:
        """One volume (InvalidRequest if there is none of that name)."""
        from ._sync import run_sync

        return run_sync(self._async.info(name))

    def delete(self, name: str) -> None:
        """Remove a volume and its files; InvalidRequest while a sandbox has it mounted."""
        from ._sync import run_sync

        run_sync(self._async.delete(name))
