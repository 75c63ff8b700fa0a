"""A stand-in for IPython in a Sandlot session without it: ``IPython.display`` sends rich results to the
session (``display(obj)`` is a result of the call, as in Jupyter). ``get_ipython()`` is None: there is no
IPython shell here (notebook magics still work: Sandlot rewrites them)."""

version_info = (0, 0, 0, "sandlot")
__version__ = "0.0.0+sandlot"


def get_ipython():
    return None
