"""Sandlot networking: per-sandbox egress policy, DNS, broker, and secrets substitution (issue #13)."""
