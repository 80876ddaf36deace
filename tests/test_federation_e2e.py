"""Real federations on loopback: nearl-server (SuperLink + ServerApp) and nearl-client (SuperNodes).

Two federations, each shared by the assertions that can read the same run:

* ``secured`` (a module fixture; a cold federation, ``nearl-client --cold``, a process per message, runs
  alongside it on the same data): TLS and SuperNode authentication, two honest
  sites, an unregistered intruder, a registered node that claims another site's name, and a site
  on another backbone; two rounds and the final evaluation (where the refused node is told why). Meanwhile an
  outsider with the CA certificate points ``flwr`` at the public port: ``flwr run`` of a
  foreign app, ``flwr stop`` of the NEARL run and ``flwr ls`` are refused, and the foreign
  app runs nowhere; the operator's ``flwr ls`` through the loopback address works.  Checked: the intruder never joins, the duplicate name and the backbone mismatch
  are refused (server line, MLflow, the refused node's own log), the honest sites' rounds,
  MLflow metrics and registered model version with its provenance, each site's audit trail
  against the hashes the server logged, ``nearl evaluate`` on the final adapters, and warm sites: one
  backbone build and one worker process per site over the run, final adapters bit-identical to the cold run.
* a site killed mid-run (the server goes on with the rest) and the coordinator stopped after
  the round it first misses and resumed in the same MLflow run (deploy/local-stack.sh covers a real MLflow server).

Every process runs in its own session on free ports, every wait is bounded, and the
fixtures stop everything they started.  Tiny ``demo`` model, tiny generated data.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess

import numpy as np
import pytest

from client.audit import read_lines
from nearl_core.demo_data import generate_demo_data
from nearl_protocol import processes as flower
from server.checkpoint import complete_rounds, load_latest
from tests.fed_helpers import (BIN, ROUND_TIMEOUT, Procs, dump, env, final_adapters, history, initial_adapters,
                               mlflow_run, nearl_client, nearl_server, secured_federation, wait_for)

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    """The secured TLS federation (2 warm sites, refused nodes, an outsider, 2 rounds) and a cold federation
    on the same data (tests/fed_helpers.secured_federation): one run read by every test of this module."""
    return secured_federation(tmp_path_factory.mktemp("secured"))


def test_tls_auth_one_round_mlflow_provenance_and_nearl_evaluate(secured):
    """Named for the one round it ran on a federation of its own; the shared run has two."""
    procs, tmp, sites, code = secured.procs, secured.tmp, secured.sites, secured.code
    assert code == 0, dump(procs)
    out = procs.text("server")
    assert "TLS, SuperNode authentication on" in out and "registered site key site1.pub (node" in out
    assert "round 1/2  sites 2/4" in out and "round 2/2  sites 2/4" in out, out
    assert "done: final adapters in" in out

    client, run = mlflow_run(f"sqlite:///{tmp / 'mlflow.db'}")
    rid = run.info.run_id
    assert run.info.status == "FINISHED"
    for key in ("train_loss", "round_seconds", "bytes_sent", "bytes_received", "site1/train_loss",
                "site2/train_loss"):
        assert set(history(client, rid, key)) == {1, 2}, key
    for key in ("eval_loss", "eval_accuracy", "eval_balanced_accuracy", "eval_macro_f1", "eval_auroc",
                "site1/eval_accuracy", "site2/eval_accuracy", "site1/eval_loss"):
        assert set(history(client, rid, key)) == {0, 1, 2}, key  # 0 = zero-shot, 2 = final adapters
    assert history(client, rid, "sites_answered") == {1: 2.0, 2: 2.0}
    params = run.data.params
    assert params["strategy"] == "fedavg" and params["backbone"] == "nearl-tiny" and params["train.lr"]
    assert params["backbone_fingerprint"].startswith("nearl-tiny|random-init seed=0|arch=")
    artifacts = {a.path for a in client.list_artifacts(rid, "final_adapters")}
    assert {"final_adapters/adapters.safetensors", "final_adapters/adapters.json"} <= artifacts
    (version,) = client.search_model_versions("name='nearl-adapters'")
    tags = version.tags
    assert tags["backbone_fingerprint"] == params["backbone_fingerprint"] and tags["rounds"] == "2"
    assert tags["sites"] == "site1,site2" and tags["code_version"]

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


def test_the_public_port_refuses_flwr_run_stop_and_ls_and_the_foreign_app_runs_nowhere(secured):
    procs, tmp, code, tried = secured.procs, secured.tmp, secured.code, secured.tried
    for what in ("run", "stop", "ls"):
        print(f"--- flwr {what} from outside ---\n{tried[what]}")
        assert '"success": false' in tried[what] and "403 Forbidden" in tried[what], f"flwr {what}: {tried[what]}"
    assert '"success": true' in tried["operator ls"], tried["operator ls"]
    out = procs.text("server")
    assert code == 0 and "(TLS, SuperNode authentication on): Fleet API only" in out, out
    assert re.search(r"SuperLink Control and Runtime APIs on 127\.0\.0\.1:\d+ \(this host only\)", out)
    # the first refusal from an address is logged with its path, the rest of that minute counted (docs/security.md)
    assert re.search(r"refused POST /v1/control/(start-run|stop-run|list-runs) from 127\.0\.0\.1:\d+ \(403", out), out
    totals = re.search(r"nearl-server proxy: forwarded \d+ requests .*; refused or failed, by status: (.*)", out)
    assert totals and int(dict(x.split(" ") for x in totals.group(1).split(", "))["403"]) >= 3, out
    assert not (tmp / "foreign-ran").exists() and not (tmp / "foreign-ran-server").exists()
    for name in ("site1", "site2", "impostor", "site4"):
        assert "foreign" not in procs.text(name)


def test_an_unregistered_node_never_joins(secured):
    procs = secured.procs
    refused = procs.text("intruder")
    assert "Failed to activate SuperNode" in refused and "SuperNode ID" not in refused, refused
    assert "intruder" not in procs.text("server")


def test_a_node_claiming_a_taken_site_name_is_refused_and_told_why(secured):
    procs, tmp = secured.procs, secured.tmp
    out = procs.text("server")
    registry = json.loads((tmp / "ck" / "site-registry.json").read_text())["sites"]
    site1_node = registry["site1"]["node_id"]
    # the node registered with site3's key answers as site1: refused, never aggregated, and told why
    # with its next instruction (here the final evaluation)
    assert f"rejected site3: duplicate site name: site1 belongs to node {site1_node}" in out, out
    assert "refused: the coordinator refuses this node: duplicate site name" in procs.text("impostor")
    client, run = mlflow_run(f"sqlite:///{tmp / 'mlflow.db'}")
    assert history(client, run.info.run_id, "sites_duplicate") == {1: 1.0, 2: 1.0}
    assert "site3" not in client.search_model_versions("name='nearl-adapters'")[0].tags["sites"]


def test_a_site_on_another_backbone_refuses_to_train(secured):
    procs, tmp = secured.procs, secured.tmp
    out = procs.text("server")
    client, run = mlflow_run(f"sqlite:///{tmp / 'mlflow.db'}")
    ours = run.data.params["backbone_fingerprint"]
    started = [line for line in procs.text("site4").splitlines() if "backbone fingerprint" in line]
    theirs = started[0].split("backbone fingerprint ", 1)[1].strip()
    assert theirs.startswith("nearl-tiny|sha256:") and theirs != ours
    assert f"rejected site4: backbone mismatch: expected {ours}, have {theirs}" in out, out
    lines = read_lines(tmp / "state-site4" / "audit.jsonl")
    assert lines and all(x["refused"].startswith("backbone mismatch") and x["bytes_sent"] == 0 for x in lines)


def test_each_sites_audit_trail_matches_what_the_server_received(secured):
    procs, tmp = secured.procs, secured.tmp
    client, run = mlflow_run(f"sqlite:///{tmp / 'mlflow.db'}")
    tags = run.data.tags
    for site in ("site1", "site2"):
        lines = [x for x in read_lines(tmp / f"state-{site}" / "audit.jsonl") if x["message_type"] == "train"]
        assert [x["round"] for x in lines] == [1, 2]
        for x in lines:
            assert x["payload_sha256"] == tags[f"payload_sha256/round_{x['round']:04d}/{site}"]
            assert x["coordinator"].startswith("127.0.0.1:") and not x["refused"]
    res = subprocess.run([str(BIN / "nearl-client"), "audit", "--state-dir", str(tmp / "state-site1")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "site1" in res.stdout, res.stderr
    # a SuperNode asked to stop exits cleanly: the fixture sent site1 SIGTERM once the run was over
    assert procs.procs["site1"].returncode == 0, dump(procs)


def test_warm_sites_build_the_backbone_once_and_end_bit_identical_to_a_cold_run(secured):
    procs, tmp, code = secured.procs, secured.tmp, secured.code
    cold_tmp, cold_procs = secured.cold_tmp, secured.cold_procs
    assert code == 0, dump(procs)
    assert secured.cold_code == 0, dump(cold_procs)
    client, run = mlflow_run(f"sqlite:///{tmp / 'mlflow.db'}")
    rid = run.info.run_id
    out = procs.text("server")
    # the secured run also sends to two refused nodes: 2 of 4 sampled answer, both warm
    assert re.search(r"round 1/2  sites 2/4  .*  warm 2/2  ", out), out
    for site in ("site1", "site2"):
        assert history(client, rid, f"{site}/worker_builds") == {1: 1.0, 2: 1.0}  # one build over the whole run
        assert history(client, rid, f"{site}/worker_warm") == {1: 1.0, 2: 1.0}
        pids = set(history(client, rid, f"{site}/worker_pid").values())
        assert len(pids) == 1, pids  # one process answered every round
        log = procs.text(site)
        assert "warm: one site worker runs this site's installed NEARL code" in log
        assert "1 CPU thread (nearl-client --threads)" in log, log  # --threads 1 reached the worker
        assert "Start `flwr-clientapp` process" not in log and "Starting Flower SuperExec" not in log, log
    assert history(client, rid, "sites_warm") == {1: 2.0, 2: 2.0}

    cold_client, cold_run = mlflow_run(secured.cold_uri)
    cold_rid = cold_run.info.run_id
    for site in ("site1", "site2"):
        assert history(cold_client, cold_rid, f"{site}/worker_warm") == {1: 0.0, 2: 0.0}
        assert len(set(history(cold_client, cold_rid, f"{site}/worker_pid").values())) == 2  # a process per message
        assert "cold: every message runs in a new process" in cold_procs.text(site)

    warm, cold = final_adapters(tmp), final_adapters(cold_tmp)
    assert set(warm) == set(cold)
    different = [k for k in warm if not np.array_equal(warm[k], cold[k])]
    assert not different, f"warm and cold runs differ in {different}"


@pytest.mark.timeout(1800)
def test_a_killed_site_and_a_stopped_coordinator_the_run_resumes_in_the_same_mlflow_run(tmp_path):
    procs = Procs(tmp_path / "logs")
    sites = generate_demo_data(tmp_path / "data", 2, train_per_site=24, val_per_site=8, test_per_site=8)
    try:
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        port = flower.free_port()
        args = ["--insecure", "--rounds", "4", "--round-timeout", ROUND_TIMEOUT, "--wait-timeout", "300",
                "--checkpoint-dir", str(tmp_path / "ck"), "--mlflow-uri", uri]
        # both sites answer round 1; site2 dies during round 2 or 3 (how far the run got before the kill lands
        # depends on the machine's load), the first round it misses is ``lost``; the next round waits for a second
        # site, so the coordinator is stopped at a known point (after round ``lost``)
        nearl_server(procs, port, tmp_path, *args, "--min-sites", "2")
        wait_for(procs, "server", "submitted", 300)
        for i, site in enumerate(sites, 1):
            nearl_client(procs, f"site{i}", site, port, tmp_path, "--insecure", "--state-dir",
                         str(tmp_path / f"state-site{i}"))
        wait_for(procs, "server", "round 1/4  sites 2/2", 900)
        procs.kill("site2")  # SIGKILL to the whole SuperNode process group, mid-run
        lost = int(wait_for(procs, "server", re.compile(r"round ([23])/4  sites 1/"), 900).group(1))
        procs.kill("server", signal.SIGTERM)  # the coordinator goes down after round ``lost``
        assert procs.procs["server"].returncode == 130, dump(procs)
        assert complete_rounds(tmp_path / "ck")[-1] == lost
        first_run = load_latest(tmp_path / "ck").mlflow_run_id
        assert not flower.port_open("127.0.0.1", port), "the SuperLink outlived nearl-server"
        out = procs.text("server")
        assert "missing: site2" in out, out

        procs.kill("site1", signal.SIGTERM)  # SuperLink state was in memory: the sites rejoin the new coordinator
        nearl_server(procs, port, tmp_path, *args, "--min-sites", "2", "--resume", str(tmp_path / "ck"),
                     name="resumed")
        wait_for(procs, "resumed", "submitted", 300)
        for i, site in enumerate(sites, 1):
            nearl_client(procs, f"site{i}", site, port, tmp_path, "--insecure", "--state-dir",
                         str(tmp_path / f"state-site{i}"), name=f"site{i}-again")
        assert procs.wait("resumed", 1200) == 0, dump(procs)
        out = procs.text("resumed")
        assert f"resuming at round {lost + 1}/4" in out and "round 4/4  sites 2/2" in out, out
        assert "round 1/4" not in out, out
        client, run = mlflow_run(uri)
        rid = run.info.run_id
        assert rid == first_run and run.info.status == "FINISHED"
        answered = {r: (1.0 if r == lost else 2.0) for r in range(1, 5)}
        assert history(client, rid, "sites_answered") == answered
        assert history(client, rid, "site2/answered") == {r: n - 1 for r, n in answered.items()}
        assert run.data.tags.get(f"round_{lost:04d}_missing") == "site2"
        assert set(history(client, rid, "eval_accuracy")) == {0, 1, 2, 3, 4}
        assert complete_rounds(tmp_path / "ck")[-1] == 4
        assert {a.path for a in client.list_artifacts(rid, "final_adapters")} >= {"final_adapters/adapters.safetensors"}
    finally:
        procs.stop_all()
