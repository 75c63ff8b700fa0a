"""What one sandbox's creation leaves in its zygote's memory, which every later fork copies (process tier).

Forks of one zygote share what a fork cannot renew (README "Security": hash secret, layout, canary), and the
README promises none of it is readable across sandboxes. The zygote serves every owner of a template (every
tenant of a server): whatever an owner's request carried through it, such as its environment, must not be
there for the next sandbox forked from it to read out of its own memory."""

from __future__ import annotations

import asyncio
import secrets

from sandlot._engine import Engine
from sandlot._spec import SandboxSpec

from .conftest import needs_sandbox

pytestmark = needs_sandbox

# The sandbox counts both markers in its own anonymous memory (heap, stack, the interpreter's arenas), in one
# pass: the control was never sent anywhere, so its count is what the scan itself holds (the needles, the
# copies it reads into), and anything more of the secret was left by someone else.
SCAN = r"""
import ctypes
needles = [bytes.fromhex(%r), bytes.fromhex(%r)]
counts = [0, 0]
with open('/proc/self/maps') as maps:
    regions = maps.read().splitlines()
for line in regions:
    fields = line.split()
    if not fields[1].startswith('r') or (len(fields) > 5 and fields[5] not in ('[heap]', '[stack]')):
        continue
    lo, hi = (int(x, 16) for x in fields[0].split('-'))
    data = ctypes.string_at(lo, hi - lo)
    for i, needle in enumerate(needles):
        counts[i] += data.count(needle)
    del data
print(*counts)
"""


def test_an_owners_environment_is_not_left_in_the_zygote_for_the_next_sandbox():
    secret = "sk-" + secrets.token_hex(24)
    control = "sk-" + secrets.token_hex(24)

    async def main() -> None:
        engine = Engine()
        engine.pools.configure("python", min_ready=0)  # every sandbox a direct fork from the zygote
        try:
            # Tenant A: a sandbox with its key in the environment (the way agents are usually given keys).
            first = await engine.create(SandboxSpec.build("python", env={"OPENAI_API_KEY": secret,
                                                                       "NOTES": "x" * 4000}))
            # ...which its code and its commands see, as before.
            assert (await first.run_code("import os; os.environ['OPENAI_API_KEY'] == %r" % secret)).text == "True"
            assert (await first.commands.run("printenv OPENAI_API_KEY")).stdout == secret + "\n"
            await first.kill()
            # Tenant B: the next sandbox of the same template, reading its own memory.
            second = await engine.create(SandboxSpec.build("python"))
            found = await second.run_code(SCAN % (secret.encode().hex(), control.encode().hex()))
            assert found.error is None, found.error
            seen_secret, seen_control = map(int, found.logs.stdout[-1].split())
            assert seen_secret == seen_control, "another owner's API key is in this sandbox's memory"
            await second.kill()
        finally:
            await engine.shutdown()
            engine.close()

    asyncio.run(main())
