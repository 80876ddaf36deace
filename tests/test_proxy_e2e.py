"""Who can reach what, for real: nearl-server with TLS and SuperNode authentication, two
registered sites, one round; meanwhile an outsider with the CA certificate points ``flwr`` at
the coordinator's public port.

Checked: ``flwr run`` of a foreign app, ``flwr stop`` of the NEARL run and ``flwr ls`` from
outside are refused (403 at the proxy, logged with path and peer); the foreign app runs
nowhere (its ServerApp and ClientApp would write a marker file); the NEARL run finishes
with both sites; ``flwr ls`` on the coordinator host, through the loopback address the
server prints, works.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from nearl_core.demo_data import generate_demo_data
from nearl_protocol import processes as flower
from nearl_protocol.processes import Certs
from tests.fed_helpers import BIN, Procs, dump, env, nearl_client, nearl_server
from tests.test_federation_e2e import make_keys, wait_for

pytestmark = [pytest.mark.slow]

FOREIGN_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "foreign"
version = "1.0.0"
description = "not part of the federation"
license = "Apache-2.0"
dependencies = ["flwr"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "outsider"

[tool.flwr.app.components]
serverapp = "foreign_app:server"
clientapp = "foreign_app:client"
"""

FOREIGN_APP = """\
from pathlib import Path

from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

MARKER = Path({marker!r})
client = ClientApp()
server = ServerApp()


@client.train()
def train(msg, context):
    MARKER.write_text("the foreign ClientApp ran")
    return msg


@server.main()
def main(grid, context):
    MARKER.write_text("the foreign ServerApp ran")
"""


def flwr_outside(args: list[str], home: Path, cwd: Path) -> str:
    res = subprocess.run([str(BIN / "flwr"), *args, "--format", "json"], env=env(home), cwd=cwd, capture_output=True,
                         text=True, timeout=120)
    return (res.stdout + res.stderr).strip()


def test_the_public_port_refuses_flwr_run_and_stop_and_the_federation_finishes(tmp_path):
    tmp = tmp_path
    procs = Procs(tmp / "logs")
    marker = tmp / "foreign-ran"
    app = tmp / "foreign"
    app.mkdir()
    (app / "pyproject.toml").write_text(FOREIGN_PYPROJECT)
    (app / "foreign_app.py").write_text(FOREIGN_APP.format(marker=str(marker)))
    sites = generate_demo_data(tmp / "data", 2, train_per_site=24, val_per_site=8, test_per_site=8)
    certs, keys = make_keys(tmp, ["site1", "site2"])
    registered = tmp / "registered"
    registered.mkdir()
    for site in ("site1", "site2"):
        (registered / f"{site}.pub").write_text((keys / f"{site}.pub").read_text())
    tls = ["--certs", str(certs)]
    try:
        port = flower.free_port()
        nearl_server(procs, port, tmp, *tls, "--auth-keys", str(registered), "--rounds", "1", "--min-sites", "2",
                     "--round-timeout", "900", "--wait-timeout", "400", "--checkpoint-dir", str(tmp / "ck"))
        wait_for(procs, "server", "submitted", 300)
        for i, site in enumerate(sites, 1):
            nearl_client(procs, f"site{i}", site, port, tmp, *tls, "--auth-key", str(keys / f"site{i}"),
                         "--state-dir", str(tmp / f"state-site{i}"))
        out = procs.text("server")
        run_id = re.search(r"run (\d+) submitted", out).group(1)

        # an outsider: the CA certificate and the public address, nothing else
        outside = tmp / "outside-home"
        flower.write_connection(outside, f"127.0.0.1:{port}", Certs(certs))
        refused = {"run": flwr_outside(["run", str(app), flower.CONNECTION], outside, tmp),
                   "stop": flwr_outside(["stop", run_id, flower.CONNECTION], outside, tmp),
                   "ls": flwr_outside(["ls", flower.CONNECTION], outside, tmp)}
        for what, text in refused.items():
            print(f"--- flwr {what} from outside ---\n{text}")
            assert '"success": false' in text and "403 Forbidden" in text, f"flwr {what}: {text}"

        # the operator, on the coordinator host, through the loopback address the server printed
        home = re.search(r"FLWR_HOME=(\S+) flwr ls", out).group(1)
        local = subprocess.run([str(BIN / "flwr"), "ls", flower.CONNECTION, "--run-id", run_id, "--format", "json"],
                               env=env(home), capture_output=True, text=True, timeout=120)
        assert '"success": true' in local.stdout, local.stdout + local.stderr

        code = procs.wait("server", 1200)
        out = procs.text("server")
        assert code == 0, dump(procs)
        assert "round 1/1  sites 2/2" in out, out
        assert "(TLS, SuperNode authentication on): Fleet API only" in out
        assert re.search(r"SuperLink Control and Runtime APIs on 127\.0\.0\.1:\d+ \(this host only\)", out)
        for path in ("/v1/control/start-run", "/v1/control/stop-run", "/v1/control/list-runs"):
            assert re.search(rf"refused POST {path} from 127\.0\.0\.1:\d+ \(403", out), (path, out)
        assert not marker.exists(), marker.read_text()
        for name in ("site1", "site2"):
            assert "foreign" not in procs.text(name)
    finally:
        procs.stop_all()
