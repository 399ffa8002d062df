"""`python -m imas_export` and `python imas_export` (absolute imports only; docs/style.md §4.2)."""

import sys
from pathlib import Path

if not __package__:  # started as `python imas_export`: put the repository root first, not the package folder
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from imas_export.cli import main  # noqa: E402

raise SystemExit(main())
