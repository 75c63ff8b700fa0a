"""Sandbox networking by policy (issue #13): nothing by default, exactly what is granted, nothing granted
usable against the host or the private network. policy.py decides, dns.py answers names, log.py remembers
every decision; the broker applies them to the traffic of a sandbox's network namespace."""
