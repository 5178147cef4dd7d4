"""``python -m podpatterns`` and the ``podpatterns`` console script.

SIGTERM and SIGINT are held (blocked) before anything else runs. Importing the commands
takes a good part of a second, and the kernel drops a signal sent to a PID namespace's
init (every container's PID 1) that has no handler for it: a SIGTERM that arrived
meanwhile (a Pod deleted while starting) was lost, and the container ran on until the
kubelet's SIGKILL. A held signal stays pending until the command has installed its
handlers and releases it (:func:`podpatterns.runtime.process.release_stop_signals`), or,
for a command that installs none, until the CLI releases it before running the command.
"""

import signal
from typing import NoReturn


def main() -> NoReturn:
    """Hold SIGTERM and SIGINT, then run the command line."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    from podpatterns.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
