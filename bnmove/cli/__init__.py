"""Command line: parsing and calling the library only; errors become one line and exit 1.

One module per command group; importing them registers their commands on ``main``.
"""

from . import demo, deploy, model, study
from ._common import main

__all__ = ["demo", "deploy", "main", "model", "study"]

if __name__ == "__main__":  # pragma: no cover
    main()
