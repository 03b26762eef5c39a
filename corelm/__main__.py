"""``python -m corelm ...`` (and ``torchrun -m corelm ...``) run the CLI."""

import sys

from corelm.cli import main

sys.exit(main())
