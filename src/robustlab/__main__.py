"""``python -m robustlab`` runs the command line (also what torchrun launches)."""

from robustlab.cli import entry

entry()
