"""The hostile-reply table of docs/security.md: each hostile case x each strategy, what the server did.

    python bench/hostile_table.py            # prints the markdown table
    python bench/hostile_table.py --write    # and replaces it in docs/security.md

Not a benchmark: it runs the cases of ``tests/hostile.py`` (the same rounds
``tests/test_hostile_replies.py`` asserts on) in one process, in a few seconds.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

START, END = "<!-- hostile-table:start -->", "<!-- hostile-table:end -->"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="replace the table in docs/security.md")
    args = ap.parse_args(argv)
    logging.disable(logging.CRITICAL)
    from tests import hostile
    from tests.fed_helpers import restore_task_identity, server_task_identity

    saved = server_task_identity()
    try:
        text = hostile.table([hostile.run_case(c, n) for c in hostile.CASES for n in hostile.NAMES])
    finally:
        restore_task_identity(saved)
    print(text)
    if args.write:
        doc = ROOT / "docs" / "security.md"
        page = doc.read_text()
        head, _, rest = page.partition(START)
        _, _, tail = rest.partition(END)
        doc.write_text(f"{head}{START}\n{text}\n{END}{tail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
