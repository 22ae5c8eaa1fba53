"""``python -m dgmood``: the command-line interface."""

from .cli import main

main()
