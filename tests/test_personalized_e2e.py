"""One personalized federation on real processes, read by every assertion here (a module-scoped fixture):
``simulation/run.py`` on two virtual sites, then ``nearl-server`` with two warm ``nearl-client`` sites on the same
virtual sites with the same seeds (2 rounds x 1 local epoch, ``--personalize oca-text,gates --finetune-epochs 1
--set train.loss=logit-adjusted``), then a second run with site1 alone and the same config.

One federation, two engines:

* the engines' final and personalized adapters are bit-identical (measured largest difference 0.0; every input
  is the same, the replies may arrive in another order, but a weighted sum of two updates does not depend on it;
  with more sites the order of the float32 sums could matter);
* MLflow holds the sites' personalized metrics (``<site>/personal_*``) equal to the simulation's, and the audit
  trails show that the local groups (``oca-text``, ``gates``) never left.

The site's verdict and ``nearl-client verify``:

* each site writes ``reports/<run>.json`` and ``.md`` after the run: zero-shot, federated (the very numbers
  its final evaluate reported to the coordinator), personalized and a local-only model that really trained;
  bytes and seconds from its audit trail;
* the second run reuses site1's cached local-only model;
* verify against the coordinator's MLflow record exits 0 with the summary, for the registered version and
  for the adapters folder, and exits 1 naming the round when one recorded hash is altered (in a copy).
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from client.audit import read_lines
from nearl_core.demo_data import generate_demo_data
from nearl_core.personalize import group_of
from nearl_protocol import keys
from nearl_protocol import processes as flower
from tests.fed_helpers import BIN, Procs, dump, history, mlflow_run, nearl_client, nearl_server, wait_for

pytestmark = [pytest.mark.slow]

FLAGS = ["--rounds", "2", "--local-epochs", "1", "--personalize", "oca-text,gates", "--finetune-epochs", "1",
         "--set", "train.loss=logit-adjusted"]
SITES = ("site1", "site2")
MODELS = ["zero-shot", "federated", "personalized", "local-only"]
LOCAL_GROUPS = {"oca-text", "gates"}
ATOL = 0.0  # measured: 0.0 (the test prints it)


def tensors(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(folder / "adapters.safetensors"))


def largest_difference(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    assert sorted(a) == sorted(b)
    return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)))) for k in a)


def reports(state: Path) -> dict[str, dict]:
    """run id -> the verdict JSON, for every report a site has written."""
    return {p.stem: json.loads(p.read_text()) for p in sorted((state / "reports").glob("[!.]*.json"))}


def wait_for_reports(procs: Procs, tmp: Path, sites: tuple[str, ...], count: int, timeout: float = 600) -> None:
    """Until each site has ``count`` verdicts: they are written after the final reply, so after the server exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all((tmp / f"state-{s}" / "reports").is_dir() and len(reports(tmp / f"state-{s}")) >= count
               for s in sites):
            return
        time.sleep(1)
    raise AssertionError(f"no site verdict {count} within {timeout:.0f}s\n{dump(procs)}")


def simulate(tmp: Path, data: Path) -> Path:
    from simulation.run import main

    out = tmp / "sim"
    assert main(["--sites", "2", "--data", str(data), "--alpha", "iid", "--out", str(out),
                 "--mlflow-uri", f"sqlite:///{tmp / 'sim.db'}", *FLAGS]) == 0
    return out


def federate(tmp: Path, data: Path, sites: tuple[str, ...], run: int) -> Procs:
    procs = Procs(tmp / f"logs-{run}")
    port = flower.free_port()
    try:
        nearl_server(procs, port, tmp, "--insecure", "--min-sites", str(len(sites)), "--round-timeout", "600",
                     "--wait-timeout", "300", "--checkpoint-dir", str(tmp / f"ck{run}"), "--mlflow-uri",
                     f"sqlite:///{tmp / 'mlflow.db'}", *FLAGS)
        wait_for(procs, "server", "submitted", 300)
        for site in sites:
            nearl_client(procs, site, data / site, port, tmp, "--insecure", "--state-dir", str(tmp / f"state-{site}"),
                         name=f"{site}-{run}")
        assert procs.wait("server", 900) == 0, dump(procs)
        wait_for_reports(procs, tmp, sites, run)
    finally:
        procs.stop_all()
    return procs


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("personalized")
    generate_demo_data(tmp / "data", 2, train_per_site=24, val_per_site=8, test_per_site=8)
    sim = simulate(tmp, tmp / "data")
    first = federate(tmp, sim / "sites", SITES, 1)
    for site in SITES:  # the second run writes its own personalized adapters over the first's
        shutil.copytree(tmp / f"state-{site}" / "personalized", tmp / "personalized-1" / site)
    t0 = time.monotonic()
    second = federate(tmp, sim / "sites", ("site1",), 2)  # the same config, site1 alone: its cache answers
    print(f"second run (site1 alone) took {time.monotonic() - t0:.0f}s")
    return tmp, first, second


def test_a_personalized_federation_is_the_same_on_nearl_server_and_in_the_simulation(federation):
    tmp, _, _ = federation
    sim = tmp / "sim"
    client, run = mlflow_run(f"sqlite:///{tmp / 'mlflow.db'}", _version_run(tmp, 1))
    personal = {k: v for k, v in run.data.metrics.items() if keys.MLFLOW_PERSONAL_PREFIX in k}
    for site in SITES:
        assert f"{site}/{keys.MLFLOW_PERSONAL_PREFIX}accuracy" in personal, sorted(run.data.metrics)

    final_difference = largest_difference(tensors(tmp / "ck1" / "final"), tensors(sim / "checkpoints" / "final"))
    personal_difference = {
        site: largest_difference(tensors(tmp / "personalized-1" / site),
                                 tensors(sim / "site-state" / site / "personalized")) for site in SITES}
    print(f"largest |difference| between the engines: final adapters {final_difference:.2e}, personalized "
          f"{personal_difference}")
    assert final_difference <= ATOL and max(personal_difference.values()) <= ATOL

    sim_client, sim_run = mlflow_run(f"sqlite:///{tmp / 'sim.db'}")
    for key, value in personal.items():
        assert sim_run.data.metrics[key] == pytest.approx(value, abs=1e-4), key

    for site in SITES:
        lines = read_lines(tmp / f"state-{site}" / "audit.jsonl")
        sent = {name for line in lines if line["message_type"] == "train" for name, _, _ in line["arrays"]}
        assert sent, f"{site}: no train reply in its audit trail"
        assert {group_of(name) for name in sent} & LOCAL_GROUPS == set()
        assert not any(".gate." in f".{name}." for name in sent)


def examples_in_test_split(tmp: Path, site: str) -> int:
    """Images in the test split of a virtual site (its manifest)."""
    with open(tmp / "sim" / "sites" / site / "manifest.csv", newline="") as fh:
        return sum(row["split"] == "test" for row in csv.DictReader(fh))


def first_report(tmp: Path, site: str) -> tuple[str, dict]:
    return min(reports(tmp / f"state-{site}").items(), key=lambda item: item[1]["time"])


def verify(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "nearl-client"), "verify", *args], capture_output=True, text=True, timeout=300)


def test_each_site_writes_its_verdict_with_the_numbers_its_final_evaluate_reported(federation):
    tmp, _, _ = federation
    client, run = mlflow_run(f"sqlite:///{tmp / 'mlflow.db'}",
                             _version_run(tmp, 1))
    for site in SITES:
        run_id, out = first_report(tmp, site)
        state = tmp / f"state-{site}"
        assert (state / "reports" / f"{run_id}.md").is_file()
        assert out["run_id"] == run_id and out["site"] == site and out["split"] == "test"
        assert [r["model"] for r in out["rows"]] == MODELS
        for row in out["rows"]:
            assert row["examples"] == examples_in_test_split(tmp, site), row
            assert all(0.0 <= row[m] <= 1.0 for m in ("accuracy", "balanced_accuracy", "macro_f1")), row
        federated = out["rows"][1]
        for metric in ("accuracy", "balanced_accuracy", "macro_f1"):
            measured = history(client, run.info.run_id, f"{site}/test_{metric}")
            assert federated[metric] == pytest.approx(measured[max(measured)], abs=1e-6), (site, metric)
        lines = [x for x in read_lines(state / "audit.jsonl") if str(x["run_id"]) == run_id]
        assert out["bytes_sent"] == sum(x["bytes_sent"] for x in lines) > 0
        assert out["bytes_received"] == sum(x["bytes_received"] for x in lines) > out["bytes_sent"] / 2
        assert 0 < out["compute_seconds"] == pytest.approx(sum(x["seconds"] for x in lines))
        assert out["epsilon_spent"] is None and out["sent_to_coordinator"] is False
        base = out["local_baseline"]
        assert base["status"] == "trained" and base["epochs"] == 2, base
        assert _trained(Path(base["folder"])) or out["rows"][3]["accuracy"] != out["rows"][0]["accuracy"]


def _trained(folder: Path) -> bool:
    """NEARL's gates start at zero: a local-only model that trained has moved them."""
    from safetensors.numpy import load_file

    return any(abs(v).max() > 0 for k, v in load_file(str(folder / "adapters.safetensors")).items() if ".gate" in k)


def _version_run(tmp: Path, version: int) -> str:
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}").get_model_version(keys.MLFLOW_REGISTERED_MODEL,
                                                                            str(version)).run_id


def test_a_second_run_reuses_the_cached_local_only_model(federation):
    tmp, _, second = federation
    (_, first), (_, again) = sorted(reports(tmp / "state-site1").items(), key=lambda item: item[1]["time"])
    assert again["local_baseline"]["status"] == "reused", again["local_baseline"]
    assert again["local_baseline"]["cache_key"] == first["local_baseline"]["cache_key"]
    assert again["rows"][3] == first["rows"][3]  # the same model on the same split
    log = second.text("site1-2")
    assert "local-only baseline: reused" in log and "local-only baseline: trained" not in log, log[-3000:]
    assert len(list((tmp / "state-site1" / "local-baseline").iterdir())) == 1


def test_verify_accepts_the_honest_record(federation):
    tmp, _, _ = federation
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    for site in SITES:
        res = verify("--state-dir", str(tmp / f"state-{site}"), "--model-version", "1", "--mlflow-uri", uri)
        assert res.returncode == 0, res.stdout + res.stderr
        assert f"OK: every update the coordinator attributes to {site} is one this site sent" in res.stdout
        assert "contributed    2 of 2 rounds: 1-2" in res.stdout and "epsilon spent  none" in res.stdout
        print(res.stdout)
    by_folder = verify("--state-dir", str(tmp / "state-site1"), "--adapters", str(tmp / "ck2" / "final"),
                       "--mlflow-uri", uri)
    assert by_folder.returncode == 0 and "contributed    2 of 2 rounds" in by_folder.stdout, by_folder.stderr
    other = verify("--state-dir", str(tmp / "state-site2"), "--model-version", "2", "--mlflow-uri", uri)
    assert other.returncode == 0 and "contributed    0 of 2 rounds" in other.stdout, other.stdout + other.stderr


def test_verify_names_the_round_whose_recorded_hash_the_site_never_sent(federation):
    from mlflow.tracking import MlflowClient

    tmp, _, _ = federation
    altered = tmp / "altered.db"
    shutil.copy(tmp / "mlflow.db", altered)
    uri = f"sqlite:///{altered}"
    run_id = MlflowClient(uri).get_model_version(keys.MLFLOW_REGISTERED_MODEL, "1").run_id
    MlflowClient(uri).set_tag(run_id, keys.payload_tag(2, "site1"), "0" * 64)
    res = verify("--state-dir", str(tmp / "state-site1"), "--model-version", "1", "--mlflow-uri", uri)
    print(res.stdout)
    assert res.returncode == 1, res.stdout + res.stderr
    assert res.stdout.startswith("nearl-client verify: MISMATCH: round 2: ") and "0" * 64 in res.stdout
    missing = verify("--state-dir", str(tmp / "state-site1"), "--model-version", "9", "--mlflow-uri", uri)
    assert missing.returncode == 2 and "nearl-adapters has no version 9" in missing.stderr
