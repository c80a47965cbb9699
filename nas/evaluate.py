"""`python -m nas.evaluate`: the command is nas.commands.evaluate."""

import sys

from nas.commands.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
