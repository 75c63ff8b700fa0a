"""Code that runs inside a sandbox. Standard library only, Python >= 3.8: it must run on any template."""
