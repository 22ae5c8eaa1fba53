"""``python -m dgmood``: the command-line interface."""

from dgmood.app.cli import main

main()
