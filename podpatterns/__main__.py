"""``python -m podpatterns``."""

from podpatterns.cli import main

main()
