"""`python -m imas_infer` / `python imas_infer`: the `imas-infer` command."""

import sys
from pathlib import Path

if not __package__:  # started as `python imas_infer` (a directory path)
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from imas_infer.cli import main  # noqa: E402

raise SystemExit(main())
