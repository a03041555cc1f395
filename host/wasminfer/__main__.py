"""`python -m wasminfer`: the `wasminfer` command."""

from wasminfer.cli import main

main()
