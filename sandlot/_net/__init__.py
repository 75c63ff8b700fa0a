"""Network egress by policy for sandboxes (issue #13): netns setup, broker, DNS, policy, secrets."""
