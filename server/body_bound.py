"""The largest legitimate Fleet request of a run, from its adapter schema: the public port's body limit.

What a site sends that grows with the model is its reply: the shared adapter tensors as
one flat array in the transport dtype (``--transport-dtype``), or, under secure
aggregation, the masked vector (uint32, the parameter count plus two slots, whatever the
transport dtype). Everything else a SuperNode sends (polls, heartbeats, metrics, a secure
round's keys and shares) is small. The limit is that largest message times
``BODY_MARGIN`` plus ``BODY_ALLOWANCE`` (server/proxy.py). Flower 1.42 also splits arrays
into objects of 5 MiB before sending them, so real bodies stay below the limit with room
to spare; the limit does not rely on that private setting.

The schema comes from building the run's model with random initialisation (the shape of
an adapter does not depend on weights). That import and build costs seconds and about a
gigabyte of memory, so nearl-server runs it in a short-lived child process, this module:

    python -m server.body_bound [--transport fp16] [--secure-aggregation] CONFIG [CONFIG ...]

prints one JSON line per config (file or shipped name).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from nearl_core.errors import NearlError
from nearl_protocol.schema import Schema, parameter_count, payload_bytes
from server.proxy import BODY_ALLOWANCE, BODY_MARGIN, MB, Limits, limits_problem

SECAGG_EXTRA_SLOTS = 2  # nearl_protocol.secagg.EXTRA_SLOTS (imported there with the cryptography)
MASKED_ITEM_BYTES = 4  # uint32


def largest_message_bytes(schema: Schema, transport: str, secure: bool) -> int:
    """Bytes of the largest array a site sends in a run with this schema, transport dtype and secure aggregation."""
    from nearl_core.transport import wire_schema

    wire = payload_bytes(wire_schema(schema, transport))
    masked = MASKED_ITEM_BYTES * (parameter_count(schema) + SECAGG_EXTRA_SLOTS) if secure else 0
    return max(wire, masked)


def body_limit(largest_message: int) -> int:
    """The body limit for a run whose largest message has ``largest_message`` bytes."""
    return math.ceil(largest_message * BODY_MARGIN) + BODY_ALLOWANCE


def run_schema(config: str) -> Schema:
    """The shared adapter schema of ``config`` (a file or shipped name), built with random initialisation.

    A ``model.pretrained`` folder stays: for hf-hub models it holds the architecture too.
    """
    from nearl_core.adapter_io import shared_schema
    from nearl_core.config import from_dict, load_config, resolve_config_path
    from nearl_core.model import build_model

    cfg = load_config(resolve_config_path(config))
    raw = cfg.to_dict()
    pretrained = cfg.model.pretrained
    keep = pretrained is not None and Path(str(pretrained)).expanduser().is_dir()
    cfg = from_dict({**raw, "model": {**raw["model"], "pretrained": pretrained if keep else None}})
    return shared_schema(build_model(cfg, cfg.task.classes or ("class-a", "class-b")))


def measure(config: str, transport: str = "float32", secure: bool = False) -> dict[str, Any]:
    schema = run_schema(config)
    largest = largest_message_bytes(schema, transport, secure)
    return {"config": config, "transport": transport, "secure_aggregation": secure,
            "payload_bytes": payload_bytes(schema), "largest_message_bytes": largest,
            "max_body_bytes": body_limit(largest)}


def measure_command(config: str, transport: str, secure: bool) -> list[str]:
    return [sys.executable, "-m", "server.body_bound", "--transport", transport,
            *(["--secure-aggregation"] if secure else []), config]


def finish(child: subprocess.Popen, timeout: float = 900.0) -> dict[str, Any]:
    """The JSON line of a :func:`measure_command` child, or a one-line NearlError."""
    try:
        out, err = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()
        raise NearlError(f"deriving the body limit from the config took over {timeout:.0f}s; pass --max-body-mb")
    if child.returncode != 0:
        last = (err.strip().splitlines() or ["no output"])[-1]
        raise NearlError(f"cannot derive the body limit from the config ({last}); fix the config or pass "
                         "--max-body-mb")
    return json.loads(out.strip().splitlines()[-1])


def start_child(config: str, transport: str, secure: bool) -> subprocess.Popen:
    """:func:`measure` in a child process, so the coordinator keeps none of the model's memory."""
    return subprocess.Popen(measure_command(config, transport, secure), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)


def measure_in_child(config: str, transport: str, secure: bool) -> dict[str, Any]:
    return finish(start_child(config, transport, secure))


class LimitsResolver:
    """nearl-server's limits from its flags; unless ``--max-body-mb`` is given, the body limit is
    derived from the run's config in a child process that runs while the SuperLink starts."""

    def __init__(self, args: argparse.Namespace, config_file: Path, transport: str, secure: bool):
        self.args, self.started = args, time.perf_counter()
        self.child = None if args.max_body_mb is not None else start_child(str(config_file), transport, secure)

    def result(self) -> tuple[Limits, str]:
        """The limits and a note on where the body limit came from (for the start-up line)."""
        if self.child is None:
            limits, note = Limits.from_args(self.args), "--max-body-mb"
        else:
            bound = finish(self.child)
            limits = Limits.from_args(self.args, max_body_bytes=int(bound["max_body_bytes"]))
            note = (f"the largest message, {bound['largest_message_bytes'] / MB:.2f} MB, x {BODY_MARGIN:g} + "
                    f"{BODY_ALLOWANCE / 2**20:g} MiB; derived from the config in "
                    f"{time.perf_counter() - self.started:.1f}s, alongside the SuperLink's start")
        if (problem := limits_problem(limits)) is not None:
            raise NearlError(problem)
        return limits, note

    def cancel(self) -> None:
        if self.child is not None and self.child.poll() is None:
            self.child.kill()
            self.child.communicate()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m server.body_bound", description=__doc__.split("\n\n")[0])
    p.add_argument("--transport", default="float32", help="float32, fp16 or bf16")
    p.add_argument("--secure-aggregation", action="store_true")
    p.add_argument("configs", nargs="+", metavar="CONFIG")
    args = p.parse_args(argv)
    try:
        for config in args.configs:
            print(json.dumps(measure(config, args.transport, args.secure_aggregation)), flush=True)
    except (NearlError, ValueError) as err:
        print(f"body_bound: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
