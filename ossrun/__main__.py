"""`python -m ossrun …`: the `ossrun` command, for a venv whose scripts are not on PATH (round 10: it was an error)."""

from ossrun.cli import main

main()
