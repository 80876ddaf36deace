"""A site's connection to its coordinator, and the one rule the site keeps about it.

The rule (docs/deployment.md, "When the coordinator is away"): a site keeps reconnecting
while it runs, but it spends no longer than ``--connect-timeout`` seconds in a row without
a working connection; past that it exits with :data:`EXIT_DISCONNECTED` and one line saying
why, so that its service manager (systemd, Docker, Kubernetes) starts it again.
``--connect-timeout 0`` removes the limit: the site reconnects for as long as it runs.
There is no third state: a site whose processes live but which no longer tries to reach
its coordinator is what this module exists to rule out.

The SuperNode says where its connection stands in its own log (Flower's retry messages,
read by the supervisor from its stderr: :data:`client.flower_internals.SUPERNODE_LOG`).
:class:`Connection` turns those events and the SuperNode's exits into a state
(connecting / connected / disconnected), the lines an operator reads, the moment to give
up, and the delay before the next SuperNode.  It starts no process and reads a clock it is
given, so it is tested without either.
"""

from __future__ import annotations

import math
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from nearl_core.errors import NearlError

EXIT_DISCONNECTED = 69  # EX_UNAVAILABLE: no coordinator within --connect-timeout; a service manager restarts the site
CONNECTING, CONNECTED, DISCONNECTED = "connecting", "connected", "disconnected"
RESTART_DELAY_CAP = 30.0  # seconds: the longest wait before a new SuperNode (1, 2, 4 ... 30)
STATUS_FIRST, STATUS_CAP = 10.0, 300.0  # seconds between status lines while offline: 10, 20, 40 ... 300


class CoordinatorUnreachable(NearlError):
    """No coordinator within --connect-timeout at start: exit with EXIT_DISCONNECTED, not 2 (a setting to fix)."""


def limit_of(seconds: float) -> float | None:
    """``--connect-timeout`` as a limit: None (no limit) for 0 or infinity."""
    return None if seconds == 0 or math.isinf(seconds) else float(seconds)


def describe_limit(limit: float | None) -> str:
    return "no limit (--connect-timeout 0)" if limit is None else f"--connect-timeout {limit:g}"


def port_reason(address: str, timeout: float = 1.0) -> str:
    """Why ``host:port`` does not take a TCP connection right now; when it does, that it does (then the trouble
    is above TCP: TLS, a proxy, the SuperLink itself; the SuperNode's log says which)."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return "its port accepts connections"
    except OSError as err:
        return err.strerror or str(err) or type(err).__name__
    except ValueError:
        return f"bad address {address!r}"


@dataclass
class StatusSchedule:
    """When the next 'still offline' line is due: after 10 s, then at doubling intervals up to 5 minutes."""

    clock: Callable[[], float]
    every: float = STATUS_FIRST
    due: float = 0.0

    def reset(self) -> None:
        self.every = STATUS_FIRST
        self.due = self.clock() + self.every

    def ready(self) -> bool:
        if self.clock() < self.due:
            return False
        self.every = min(STATUS_CAP, self.every * 2)
        self.due = self.clock() + self.every
        return True


@dataclass
class Connection:
    """Where the site's link to its coordinator stands, as the supervisor sees it."""

    coordinator: str
    limit: float | None  # seconds in a row without a connection before the site gives up; None: never
    clock: Callable[[], float] = time.monotonic
    state: str = CONNECTING
    offline_since: float | None = None  # since when there has been no working connection (None: connected)
    ever_connected: bool = False
    supernode_restarts: int = 0
    failures: int = 0  # SuperNodes ended since the last working connection: the next one's delay
    schedule: StatusSchedule = field(init=False)
    wall_offset: float = field(init=False)

    def __post_init__(self) -> None:
        self.offline_since = self.clock()
        self.schedule = StatusSchedule(self.clock)
        self.schedule.reset()
        self.wall_offset = time.time() - self.clock()

    # -- events --------------------------------------------------------------------------------------
    def on_event(self, event: str) -> str | None:
        """A SuperNode log event (client.flower_internals.supernode_event); the line to log, if any."""
        if event == "connected":
            return self.connected()
        if event == "retrying" and self.state == CONNECTED:
            return self.lost(self.reason())
        return None

    def connected(self) -> str | None:
        if self.state == CONNECTED:
            return None
        offline = self.offline_for()
        first = not self.ever_connected
        self.state, self.offline_since, self.ever_connected, self.failures = CONNECTED, None, True, 0
        if first:
            return f"connected to the coordinator at {self.coordinator}"
        n = self.supernode_restarts
        restarts = f"; {n} SuperNode restart{'s' if n != 1 else ''} so far" if n else ""
        return f"connected to the coordinator at {self.coordinator} again after {offline:.0f}s without it{restarts}"

    def lost(self, reason: str) -> str:
        """The connection broke (the SuperNode retries, ended, or was killed)."""
        self.state, self.offline_since = DISCONNECTED, self.clock()
        self.schedule.reset()
        return f"lost the coordinator at {self.coordinator} ({reason}); reconnecting {self.allowance()}"

    def supernode_ended(self, why: str) -> tuple[str, float]:
        """The SuperNode is gone (exited, gave up, hung and killed): the line to log and the delay before the next."""
        if self.state == CONNECTED:
            self.state, self.offline_since = DISCONNECTED, self.clock()
            self.schedule.reset()
        self.failures += 1
        delay = min(RESTART_DELAY_CAP, 2.0 ** (self.failures - 1))
        return f"{why}; starting a new SuperNode in {delay:g}s, reconnecting {self.allowance()}", delay

    def supernode_started(self) -> None:
        self.supernode_restarts += 1

    def supernode_up(self) -> None:
        """A SuperNode's Runtime API answered. Before the first connection the wait starts now: the time the
        site took to start its own processes (seconds on a busy machine) is not time without the coordinator."""
        if self.state == CONNECTING:
            self.offline_since = self.clock()
            self.schedule.reset()

    # -- time ----------------------------------------------------------------------------------------
    def offline_for(self) -> float:
        return 0.0 if self.offline_since is None else self.clock() - self.offline_since

    def over_limit(self) -> bool:
        return self.limit is not None and self.offline_for() >= self.limit

    def allowance(self) -> str:
        if self.limit is None:
            return "for as long as this site runs (--connect-timeout 0)"
        return f"for up to {max(0.0, self.limit - self.offline_for()):.0f}s more (--connect-timeout {self.limit:g})"

    def reason(self) -> str:
        return port_reason(self.coordinator)

    def status_line(self) -> str | None:
        """The periodic 'still offline' line, when one is due."""
        if self.state == CONNECTED or not self.schedule.ready():
            return None
        what = "no connection to" if self.ever_connected else "not yet connected to"
        return (f"{what} the coordinator at {self.coordinator} for {self.offline_for():.0f}s ({self.reason()}); "
                f"still reconnecting {self.allowance()}")

    def give_up_line(self) -> str:
        return (f"no connection to the coordinator at {self.coordinator} for {self.offline_for():.0f}s "
                f"({describe_limit(self.limit)}; {self.reason()}); stopping this site with exit status "
                f"{EXIT_DISCONNECTED} so that its service manager (systemd, Docker, Kubernetes) starts it again")

    def status(self) -> dict[str, Any]:
        """The connection fields of the supervisor's status.json (read by nearl-client health)."""
        since = None if self.offline_since is None else round(self.offline_since + self.wall_offset, 3)
        return {"connection": self.state, "offline_since": since, "connect_timeout": self.limit,
                "coordinator": self.coordinator, "supernode_restarts": self.supernode_restarts}


def split_server(server: str) -> tuple[str, int]:
    """``host:port`` (IPv6 as ``[::1]:9092``) as a (host, port) pair; NearlError otherwise."""
    host, sep, port = server.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise NearlError(f"--server {server!r}: expected host:port, e.g. fl.hospital.org:9092")
    return host.removeprefix("[").removesuffix("]"), int(port)


def wait_for_coordinator(server: str, timeout: float, *, interval: float = 1.0) -> None:
    """Return once a TCP connection to ``server`` opens; CoordinatorUnreachable after ``timeout`` s (0: never).

    Flower's SuperNode retries an unreachable SuperLink and logs every try; a wrong address
    or a closed firewall port would be a process that never says what is wrong.  A plain
    connect before the supervisor starts turns that into one line naming the address.  It
    waits rather than trying once, so sites may start before the server, and says so after
    10 s and then at doubling intervals (up to every 5 minutes).
    """
    host, port = split_server(server)
    limit = limit_of(timeout)
    start = time.monotonic()
    deadline = None if limit is None else start + limit
    schedule = StatusSchedule(time.monotonic)
    schedule.reset()
    while True:
        left = None if deadline is None else deadline - time.monotonic()
        try:
            with socket.create_connection((host, port), timeout=10.0 if left is None else min(10.0, max(0.1, left))):
                return
        except OSError as err:
            reason = err.strerror or str(err) or type(err).__name__
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise CoordinatorUnreachable(
                f"the coordinator at {server} could not be reached within {timeout:g}s ({reason}); check --server, "
                f"that nearl-server is running there, and that a firewall lets this machine reach port {port}"
            )
        if schedule.ready():
            more = describe_limit(limit) if left is None else f"{left:.0f}s more, {describe_limit(limit)}"
            print(f"nearl-client: waiting for the coordinator at {server} for {time.monotonic() - start:.0f}s "
                  f"({reason}; {more})", flush=True)
        time.sleep(interval if left is None else min(interval, left))
