"""``python -m schedany`` — the same as the ``schedany`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
