"""``python -m taskscheduler`` runs the command line."""

from .cli import main

main()
