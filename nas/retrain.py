"""`python -m nas.retrain`: the command is nas.commands.retrain."""

import sys

from nas.commands.retrain import main

if __name__ == "__main__":
    sys.exit(main())
