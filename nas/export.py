"""`python -m nas.export`: the command is nas.commands.export."""

import sys

from nas.commands.export import main

if __name__ == "__main__":
    sys.exit(main())
