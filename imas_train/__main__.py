"""`python -m imas_train`, `accelerate launch -m imas_train` and `accelerate launch imas_train` (docs/style.md §4.2)."""

import sys
from pathlib import Path

if not __package__:  # started as `python imas_train` or `accelerate launch imas_train`
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from imas_train.cli import main  # noqa: E402

raise SystemExit(main())
