"""``python -m masksparse``: run the command line (see :mod:`masksparse.cli`)."""

import sys

from masksparse.cli import main

if __name__ == "__main__":
    sys.exit(main())
