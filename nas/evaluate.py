"""`python -m nas.evaluate`: score predicted masks against reference labels; the command is nas.commands.evaluate."""

import sys

from nas.commands.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
