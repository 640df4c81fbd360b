"""``python -m robustlab`` runs the command line (also what torchrun launches)."""

import sys

from robustlab.cli import main

sys.exit(main())
