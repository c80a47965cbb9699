"""`python -m nas.run`: the command is nas.commands.run."""

import sys

from nas.commands.run import main

if __name__ == "__main__":
    sys.exit(main())
