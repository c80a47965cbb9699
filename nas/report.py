"""`python -m nas.report`: the command is nas.commands.report."""

import sys

from nas.commands.report import main

if __name__ == "__main__":
    sys.exit(main())
