"""``python -m bofrs`` / ``bofrs``: the command line (:mod:`bofrs.cli`)."""

from __future__ import annotations

import sys

from bofrs.cli import main

if __name__ == "__main__":
    sys.exit(main())
