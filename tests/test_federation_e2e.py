"""Real federations on loopback: nearl-server (SuperLink + ServerApp) and nearl-client (SuperNodes).

Every test starts its processes in their own sessions on free ports, bounds every wait,
and stops everything it started in the fixture teardown.  Tiny ``demo`` model, tiny
generated data, one local epoch.  These are slow on a 2-core machine (each message
starts a fresh ``flwr-clientapp`` process): marked ``slow``; ``make test`` runs them.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from nearl_core.demo_data import generate_demo_data
from nearl_protocol import processes as flower
from server.checkpoint import complete_rounds, load_latest
from tests.fed_helpers import BIN, ROOT, Procs, dump, env, history, mlflow_run, nearl_client, nearl_server

pytestmark = [pytest.mark.slow]
ROUND_TIMEOUT = "900"  # generous: other work shares the 2 CPU cores; a dead site is detected by heartbeat (~60 s)


@pytest.fixture
def fed(tmp_path):
    procs = Procs(tmp_path / "logs")
    sites = generate_demo_data(tmp_path / "data", 2, train_per_site=24, val_per_site=8, test_per_site=8)
    try:
        yield procs, tmp_path, sites
    finally:
        procs.stop_all()


def wait_for(procs: Procs, name: str, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in procs.text(name):
            return
        if procs.procs[name].poll() is not None:
            break
        time.sleep(1)
    raise AssertionError(f"'{text}' not seen in {name} within {timeout:.0f}s\n{dump(procs)}")


def initial_adapters() -> dict[str, np.ndarray]:
    from nearl_core.adapter_io import get_adapter_state
    from nearl_core.config import load_config
    from nearl_core.model import build_model

    return {k: v.numpy() for k, v in get_adapter_state(build_model(load_config("demo"))).items()}


@pytest.mark.timeout(1800)
def test_two_sites_two_rounds_with_mlflow_and_nearl_evaluate(fed):
    procs, tmp, sites = fed
    port = flower.free_port()
    nearl_server(procs, port, tmp, "--insecure", "--rounds", "2", "--min-sites", "2",
                 "--round-timeout", ROUND_TIMEOUT, "--wait-timeout", "300", "--checkpoint-dir", str(tmp / "ck"))
    wait_for(procs, "server", "submitted", 300)
    for i, site in enumerate(sites, 1):
        nearl_client(procs, f"site{i}", site, port, tmp, "--insecure")
    assert procs.wait("server", 1700) == 0, dump(procs)
    out = procs.text("server")
    assert "round 1/2  sites 2/2" in out and "round 2/2  sites 2/2" in out, out
    assert "done: final adapters in" in out
    # a SuperNode asked to stop exits cleanly
    for name in ("site1", "site2"):
        procs.kill(name, signal.SIGTERM)
        assert procs.procs[name].returncode == 0, dump(procs)

    client, run = mlflow_run(f"sqlite:///{tmp / 'mlflow.db'}")
    rid = run.info.run_id
    assert run.info.status == "FINISHED"
    for key in ("train_loss", "round_seconds", "bytes_sent", "bytes_received", "sites_answered",
                "site1/train_loss", "site2/train_loss"):
        assert set(history(client, rid, key)) == {1, 2}, key
    for key in ("eval_loss", "eval_accuracy", "eval_balanced_accuracy", "eval_macro_f1", "eval_auroc",
                "site1/eval_accuracy", "site2/eval_accuracy", "site1/eval_loss"):
        assert set(history(client, rid, key)) == {0, 1, 2}, key  # 0 = zero-shot, 2 = final adapters
    assert history(client, rid, "sites_answered") == {1: 2.0, 2: 2.0}
    assert run.data.params["strategy"] == "fedavg" and run.data.params["backbone"] == "nearl-tiny"
    assert run.data.params["num_sites"] == "2" and run.data.params["train.lr"]
    artifacts = {a.path for a in client.list_artifacts(rid, "final_adapters")}
    assert {"final_adapters/adapters.safetensors", "final_adapters/adapters.json"} <= artifacts
    assert client.search_model_versions("name='nearl-adapters'")

    from safetensors.numpy import load_file

    final = load_file(str(tmp / "ck" / "final" / "adapters.safetensors"))
    start = initial_adapters()
    assert set(final) == set(start)
    assert any(not np.allclose(final[k], start[k]) for k in start), "federated adapters equal the initial ones"
    assert complete_rounds(tmp / "ck") == [1, 2]

    res = subprocess.run([str(BIN / "nearl"), "evaluate", "--adapters", str(tmp / "ck" / "final"), "--data",
                          str(sites[0]), "--json"], env=env(tmp / "home-eval"), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert '"accuracy"' in res.stdout and '"examples": 8' in res.stdout


@pytest.mark.timeout(1800)
def test_tls_and_supernode_auth_refuse_an_unregistered_site(fed):
    procs, tmp, sites = fed
    certs, keys, pubs = tmp / "certs", tmp / "keys", tmp / "registered"
    subprocess.run([str(ROOT / "deploy" / "make-certs.sh"), "--out", str(certs), "localhost"], check=True,
                   capture_output=True, timeout=120)
    for site in ("site1", "site2", "intruder"):
        subprocess.run([str(ROOT / "deploy" / "make-site-key.sh"), "--out", str(keys), site], check=True,
                       capture_output=True, timeout=60)
    pubs.mkdir()
    for site in ("site1", "site2"):  # the intruder's key is never registered
        (pubs / f"{site}.pub").write_text((keys / f"{site}.pub").read_text())
    port = flower.free_port()
    nearl_server(procs, port, tmp, "--certs", str(certs), "--auth-keys", str(pubs), "--rounds", "1",
                 "--min-sites", "2", "--round-timeout", ROUND_TIMEOUT, "--wait-timeout", "300",
                 "--checkpoint-dir", str(tmp / "ck"))
    wait_for(procs, "server", "submitted", 300)
    assert "registered site key site1.pub" in procs.text("server")
    nearl_client(procs, "intruder", sites[0], port, tmp, "--certs", str(certs), "--auth-key",
                            str(keys / "intruder"))
    for i, site in enumerate(sites, 1):
        nearl_client(procs, f"site{i}", site, port, tmp, "--certs", str(certs), "--auth-key", str(keys / f"site{i}"))
    assert procs.wait("server", 1700) == 0, dump(procs)
    out = procs.text("server")
    assert "TLS, SuperNode authentication on" in out and "round 1/1  sites 2/2" in out, out
    assert "intruder" not in out
    # the unregistered node is refused by the SuperLink and never gets a node id
    refused = procs.text("intruder")
    assert "Failed to activate SuperNode" in refused and "SuperNode ID" not in refused, refused
    client, run = mlflow_run(f"sqlite:///{tmp / 'mlflow.db'}")
    assert set(history(client, run.info.run_id, "train_loss")) == {1}


@pytest.mark.timeout(1800)
def test_killed_site_the_server_finishes_with_the_rest_against_a_real_mlflow_server(fed):
    procs, tmp, sites = fed
    mlport = flower.free_port()
    procs.start("mlflow", [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlport),
                           "--backend-store-uri", f"sqlite:///{tmp / 'mlserver.db'}",
                           "--artifacts-destination", str(tmp / "mlartifacts"), "--workers", "1"],
                env=env(tmp / "home-mlflow"), cwd=tmp)
    flower.wait_for_port("127.0.0.1", mlport, procs.procs["mlflow"], procs.log("mlflow"), "mlflow server", 180)
    port = flower.free_port()
    nearl_server(procs, port, tmp, "--insecure", "--rounds", "3", "--min-sites", "1", "--round-timeout", ROUND_TIMEOUT,
                 "--wait-timeout", "300", "--checkpoint-dir", str(tmp / "ck"),
                 "--mlflow-uri", f"http://127.0.0.1:{mlport}")
    wait_for(procs, "server", "submitted", 300)
    for i, site in enumerate(sites, 1):
        nearl_client(procs, f"site{i}", site, port, tmp, "--insecure")
    wait_for(procs, "server", "round 1/3  sites 2/2", 1200)
    procs.kill("site2")  # SIGKILL to the whole SuperNode process group, mid-run
    assert procs.wait("server", 1700) == 0, dump(procs)
    out = procs.text("server")
    assert "missing: site2" in out and "round 3/3  sites 1/" in out, out
    client, run = mlflow_run(f"http://127.0.0.1:{mlport}")
    rid = run.info.run_id
    assert history(client, rid, "sites_answered") == {1: 2.0, 2: 1.0, 3: 1.0}
    assert history(client, rid, "site2/answered") == {1: 1.0, 2: 0.0, 3: 0.0}
    assert history(client, rid, "sites_missing")[3] == 1.0
    assert run.data.tags.get("round_0002_missing") == "site2"
    assert {a.path for a in client.list_artifacts(rid, "final_adapters")} >= {"final_adapters/adapters.safetensors"}


@pytest.mark.timeout(1800)
def test_resume_continues_in_the_same_mlflow_run(fed):
    procs, tmp, sites = fed
    port = flower.free_port()
    args = ["--insecure", "--rounds", "2", "--min-sites", "2", "--round-timeout", ROUND_TIMEOUT, "--wait-timeout", "300"]
    nearl_server(procs, port, tmp, *args, "--checkpoint-dir", str(tmp / "ck"))
    wait_for(procs, "server", "submitted", 300)
    for i, site in enumerate(sites, 1):
        nearl_client(procs, f"site{i}", site, port, tmp, "--insecure")
    wait_for(procs, "server", "round 1/2  sites 2/2", 1200)
    procs.kill("server", signal.SIGTERM)  # the coordinator goes down after round 1
    assert procs.procs["server"].returncode == 130, dump(procs)
    assert complete_rounds(tmp / "ck")[-1] == 1
    first_run = load_latest(tmp / "ck").mlflow_run_id
    assert not flower.port_open("127.0.0.1", port), "the SuperLink outlived nearl-server"

    for name in ("site1", "site2"):  # SuperLink state is in memory: the sites rejoin the new coordinator
        procs.kill(name, signal.SIGTERM)
    nearl_server(procs, port, tmp, *args, "--resume", str(tmp / "ck"), name="resumed")
    wait_for(procs, "resumed", "submitted", 300)
    for i, site in enumerate(sites, 1):
        nearl_client(procs, f"site{i}", site, port, tmp, "--insecure", name=f"site{i}-again")
    assert procs.wait("resumed", 1700) == 0, dump(procs)
    out = procs.text("resumed")
    assert "resuming at round 2/2" in out and "round 2/2  sites 2/2" in out and "round 1/2" not in out, out
    client, run = mlflow_run(f"sqlite:///{tmp / 'mlflow.db'}")
    assert run.info.run_id == first_run and run.info.status == "FINISHED"
    assert set(history(client, first_run, "train_loss")) == {1, 2}
    assert set(history(client, first_run, "eval_accuracy")) == {0, 1, 2}
    assert complete_rounds(tmp / "ck")[-1] == 2
