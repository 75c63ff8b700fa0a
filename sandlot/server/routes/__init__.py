"""HTTP routes, one module per resource: sandboxes, execution (code, commands, one-shot), files, system."""
