"""``python -m ribbed`` is the ``ribbed`` command."""

from ribbed.cli import main

main()
