"""`python -m nas.ensemble`: average saved probabilities of several models into masks; the command is nas.commands.ensemble."""

import sys

from nas.commands.ensemble import main

if __name__ == "__main__":
    sys.exit(main())
