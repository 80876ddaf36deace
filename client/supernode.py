"""``python -m client.supernode ARGS``: Flower's ``flower-supernode`` as a process that ends with its connection.

Flower 1.42's SuperNode returns from its connection loop when it stops talking to the
SuperLink for good (it gave up retrying under ``--max-wait-time``, or met an error it does
not retry: a TLS failure, an HTTP 500), but its Runtime API thread keeps the process
alive: a SuperNode that runs and is connected to nothing, which no supervisor or service
manager can tell from a healthy one.  Here the end of that loop ends the process, with
:data:`EXIT_LOOP_ENDED` and one line, so the site's supervisor (:mod:`client.supervisor`)
starts a new SuperNode.  Signals end it as Flower does (exit 0 after a graceful stop;
SIGINT is also how Flower leaves a SuperLink that no longer knows this node).

The arguments are ``flower-supernode``'s.  Flower's entry point is reached through
:mod:`client.flower_internals`.
"""

from __future__ import annotations

import os
import sys

EXIT_LOOP_ENDED = 76  # Flower's connection loop returned: nothing of this SuperNode talks to the SuperLink


def main(argv: list[str] | None = None) -> int:
    from client import flower_internals as fi

    sys.argv = ["flower-supernode", *(sys.argv[1:] if argv is None else argv)]
    fi.run_supernode()  # returns only when the connection loop has ended
    print(f"nearl-supernode: {fi.SUPERNODE_LOOP_ENDED}; exiting with code {EXIT_LOOP_ENDED} so that a new "
          "SuperNode connects", file=sys.stderr, flush=True)
    os._exit(EXIT_LOOP_ENDED)  # the Runtime API's non-daemon thread would keep a normal exit waiting for ever


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
