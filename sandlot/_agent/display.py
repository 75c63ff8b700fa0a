"""Where displayed results go in a session process: the kernel registers itself here when it starts, and
the matplotlib backend (mpl_backend.py) sends ``plt.show()``'s figures to it. A module of its own so that
the backend does not import the kernel (which imports the backend to render figures)."""

CURRENT = None  # the session's Kernel, once it serves
