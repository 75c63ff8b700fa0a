"""A matplotlib backend (``MPLBACKEND=module://_agent.mpl_backend``) that returns figures as PNG results.

Drawing is Agg's; ``plt.show()`` sends each open figure to the host as an image/png result and closes
it, which is what a notebook's inline backend does.
"""

from __future__ import annotations

import base64
import io

from matplotlib.backend_bases import FigureManagerBase
from matplotlib.backends.backend_agg import FigureCanvasAgg

FigureCanvas = FigureCanvasAgg
FigureManager = FigureManagerBase


def figure_png(figure) -> str:
    buf = io.BytesIO()
    figure.savefig(buf, format="png", bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def show(*args, **kwargs) -> None:
    import matplotlib.pyplot as plt

    from . import display

    for num in plt.get_fignums():
        figure = plt.figure(num)
        if display.CURRENT is not None:
            display.CURRENT.display_data({"text/plain": repr(figure), "image/png": figure_png(figure)})
    plt.close("all")
