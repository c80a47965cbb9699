"""`python -m nas.retrain`: retrain front members at the full budget, or cross-validate them; the command is nas.commands.retrain."""

import sys

from nas.commands.retrain import main

if __name__ == "__main__":
    sys.exit(main())
