"""`python -m nas.ensemble`: the command is nas.commands.ensemble."""

import sys

from nas.commands.ensemble import main

if __name__ == "__main__":
    sys.exit(main())
