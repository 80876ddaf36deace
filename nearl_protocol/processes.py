"""Small, explicit wrappers over Flower's command-line tools (SuperLink, SuperNode, ``flwr``).

Every process gets its own ``FLWR_HOME`` and the run-time environment of the project
(telemetry and update checks off, offline hub).  Nothing here is specific to NEARL's
model; both CLIs and the tests use it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

BIN = Path(sys.executable).parent
APP_DIR = Path(__file__).resolve().parents[1]  # the project root: pyproject.toml with [tool.flwr.app]
CONNECTION = "nearl"
QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "PYTHONUNBUFFERED": "1",
}


class FlowerError(RuntimeError):
    """A Flower process or command failed; the message is one readable line."""


def tool(name: str) -> str:
    """A console script of this environment (flower-superlink, flwr, ...)."""
    path = BIN / name
    return str(path) if path.exists() else name


def flower_env(flwr_home: str | Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    for key, value in QUIET_ENV.items():
        env.setdefault(key, value)
    env["FLWR_HOME"] = str(flwr_home)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # flwr-serverapp / flwr-clientapp of this env
    env.update(extra or {})
    return env


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def tail(path: str | Path, lines: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@dataclass
class Certs:
    """``--certs DIR`` as written by deploy/make-certs.sh."""

    root: Path

    @property
    def ca(self) -> Path:
        return self.root / "ca.crt"

    @property
    def cert(self) -> Path:
        return self.root / "server.pem"

    @property
    def key(self) -> Path:
        return self.root / "server.key"

    def check(self, server: bool) -> None:
        needed = [self.ca] + ([self.cert, self.key] if server else [])
        missing = [str(p) for p in needed if not p.is_file()]
        if missing:
            raise FlowerError(f"certificate file(s) {', '.join(missing)} not found; make them with "
                              "deploy/make-certs.sh HOST, or pass --insecure for a loopback test")


def start_process(cmd: Sequence[str], *, env: dict[str, str], log_file: Path, cwd: str | Path | None = None
                  ) -> subprocess.Popen:
    """Start ``cmd`` in its own session (so its children can be stopped together), output to ``log_file``."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    fh = open(log_file, "ab")
    try:
        return subprocess.Popen(list(cmd), env=env, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    finally:
        fh.close()


def descendants(pid: int) -> list[int]:
    """All descendant pids of ``pid`` (Linux /proc; empty elsewhere).

    Flower's SuperLink starts its SuperExec in a new session, so stopping the SuperLink's
    process group alone would leave the SuperExec and the ServerApp running.
    """
    children: dict[int, list[int]] = {}
    proc_dir = Path("/proc")
    if not proc_dir.is_dir():
        return []
    for entry in proc_dir.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat[stat.rfind(")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def stop_process(proc: subprocess.Popen | None, timeout: float = 10.0) -> None:
    """SIGTERM the process group and every descendant, then SIGKILL what is left after ``timeout``."""
    if proc is None:
        return
    family = descendants(proc.pid)
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    try:  # children that outlived their parent in the same group
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for pid in family:  # descendants in other sessions (SuperExec, ServerApp)
        try:
            os.kill(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + 5.0
    while family and time.monotonic() < deadline:
        family = [p for p in family if _alive(p)]
        time.sleep(0.2)
    for pid in family:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rfind(")") + 2] != "Z"
    except OSError:
        return False


def superlink_command(*, host: str, port: int, certs: Certs | None, database: Path | None,
                      supernode_auth: bool = False) -> list[str]:
    cmd = [tool("flower-superlink"), "--host", host, "--port", str(port),
           "--disable-runtime-dependency-installation"]
    if certs is None:
        cmd.append("--insecure")
    else:
        cmd += ["--ssl-ca-certfile", str(certs.ca), "--ssl-certfile", str(certs.cert),
                "--ssl-keyfile", str(certs.key)]
    if supernode_auth:
        cmd.append("--enable-supernode-auth")
    if database is not None:
        cmd += ["--database", str(database)]
    return cmd


def fleet_proxy_command(*, host: str, port: int, upstream_port: int, certs: Certs | None,
                        limits: Sequence[str] = ()) -> list[str]:
    """server/proxy.py on the public ``host:port`` in front of a SuperLink on 127.0.0.1:``upstream_port``.

    With ``certs`` TLS terminates at the proxy and the proxy verifies the SuperLink (which keeps
    its own TLS: Flower's SuperNode authentication requires it) with the federation CA.
    ``limits``: the proxy's limit flags (server.proxy.Limits.to_args).
    """
    listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    cmd = [sys.executable, "-m", "server.proxy", "--listen", listen, *limits]
    if certs is None:
        return cmd + ["--upstream", f"http://127.0.0.1:{upstream_port}"]
    return cmd + ["--upstream", f"https://127.0.0.1:{upstream_port}", "--ca", str(certs.ca),
                  "--certfile", str(certs.cert), "--keyfile", str(certs.key)]


def quote_node_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    text = str(value)
    if '"' in text or "\\" in text or "\n" in text:
        raise FlowerError(f"node config value {text!r} may not contain quotes, backslashes or newlines")
    return f'"{text}"'


def supernode_command(*, superlink: str, port: int, node_config: dict[str, Any], certs: Certs | None,
                      auth_key: Path | None = None, host: str = "127.0.0.1", secret_file: Path | None = None
                      ) -> list[str]:
    """``flower-supernode``; with ``secret_file``, process isolation: its Runtime API (on ``host:port``)
    waits for an outside executor (the NEARL site worker) that signs its requests with that secret."""
    config = " ".join(f"{k}={quote_node_value(v)}" for k, v in node_config.items())
    cmd = [tool("flower-supernode"), "--superlink", superlink, "--host", host, "--port", str(port),
           "--node-config", config]
    if secret_file is not None:
        cmd += ["--isolation", "process", "--superexec-auth-secret-file", str(secret_file)]
    cmd += ["--insecure"] if certs is None else ["--root-certificates", str(certs.ca)]
    if auth_key is not None:
        cmd += ["--auth-supernode-private-key", str(auth_key)]
    return cmd


def write_connection(flwr_home: Path, address: str, certs: Certs | None) -> None:
    """``$FLWR_HOME/config.toml`` with one SuperLink connection named ``nearl``."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]", f'address = "{address}"']
    lines += ["insecure = true"] if certs is None else [f'root-certificates = "{certs.ca.resolve()}"']
    (flwr_home / "config.toml").write_text("\n".join(lines) + "\n")


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def write_run_config(path: Path, values: dict[str, Any]) -> Path:
    """A TOML file for ``flwr run --run-config FILE`` (dotted keys become ``section.key``)."""
    path.write_text("".join(f"{_toml_key(k)} = {toml_value(v)}\n" for k, v in values.items()))
    return path


def _toml_key(key: str) -> str:
    return ".".join(part if part.replace("-", "").replace("_", "").isalnum() else json.dumps(part)
                    for part in key.split("."))


def flwr_json(args: Sequence[str], *, env: dict[str, str], timeout: float = 120.0, cwd: str | Path | None = None
              ) -> dict[str, Any]:
    """Run ``flwr ARGS --format json`` and parse its output; FlowerError with its message otherwise."""
    cmd = [tool("flwr"), *args, "--format", "json"]
    try:
        out = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise FlowerError(f"'flwr {args[0]}' did not answer within {timeout:.0f}s") from None
    text = out.stdout.strip()
    start = text.find("{")
    try:
        data = json.loads(text[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        data = {}
    if not data.get("success", False):
        detail = data.get("error-message") or (out.stderr.strip() or text).splitlines()[-1:] or ["no output"]
        if isinstance(detail, list):
            detail = detail[0]
        raise FlowerError(f"flwr {args[0]} failed: {detail}")
    return data


# `flwr ls` is a Python process per call (about a CPU-second); a run's progress arrives through its progress
# file, so the status is asked for often only once that file says the run has ended, and otherwise rarely,
# as the backstop for a ServerApp that dies without a word.
STATUS_POLL_SECONDS = 10.0
STATUS_POLL_ENDING_SECONDS = 1.0


def status_due(last_poll: float, *, ending: bool) -> bool:
    """Whether to ask the SuperLink for the run's status now (``last_poll``: time.monotonic() of the last ask)."""
    return time.monotonic() - last_poll > (STATUS_POLL_ENDING_SECONDS if ending else STATUS_POLL_SECONDS)


def run_status(run_id: str, *, env: dict[str, str]) -> tuple[str, str]:
    data = flwr_json(["ls", CONNECTION, "--run-id", str(run_id)], env=env, timeout=120)
    runs = data.get("runs") or [{}]
    return str(runs[0].get("status", "unknown")), str(runs[0].get("status-details", ""))


def run_logs(run_id: str, *, env: dict[str, str], lines: int = 20) -> str:
    try:
        out = subprocess.run([tool("flwr"), "log", str(run_id), CONNECTION, "--show"], env=env,
                             capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return ""
    return "\n".join((out.stdout + out.stderr).strip().splitlines()[-lines:])


def wait_for_port(host: str, port: int, proc: subprocess.Popen, log_file: Path, what: str,
                  timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            last = tail(log_file, 5).splitlines()
            raise FlowerError(f"{what} exited with code {proc.returncode}: "
                              f"{last[-1] if last else 'no output'} (log: {log_file})")
        if port_open(host, port):
            return
        time.sleep(0.3)
    raise FlowerError(f"{what} did not open {host}:{port} within {timeout:.0f}s (log: {log_file})")
