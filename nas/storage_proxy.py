"""`python -m nas.storage_proxy`: the command is nas.commands.storage_proxy."""

import sys

from nas.commands.storage_proxy import main

if __name__ == "__main__":
    sys.exit(main())
