"""`python -m nas.export`: write one architecture of the front as a model folder; the command is nas.commands.export."""

import sys

from nas.commands.export import main

if __name__ == "__main__":
    sys.exit(main())
