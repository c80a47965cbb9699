"""`python -m nas.dashboard`: the command is nas.commands.dashboard."""

import sys

from nas.commands.dashboard import main

if __name__ == "__main__":
    sys.exit(main())
