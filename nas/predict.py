"""`python -m nas.predict`: the command is nas.commands.predict."""

import sys

from nas.commands.predict import main

if __name__ == "__main__":
    sys.exit(main())
