"""What a sandbox may see of the host's storage: host directories granted one by one, and named volumes.

``mounts``: the request (parsed and validated with the spec, no host access); ``hostdir``: opening a
granted host directory safely and checking it against the operator's roots; ``idmap``: the id-mapped,
detached mounts a sandbox attaches; ``volumes``: named, persistent, size-capped volumes (loop-mounted ext4
images); ``grants``: a sandbox's mounts prepared on the host (opened, locked, mounted) and released.
"""
