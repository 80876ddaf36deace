"""One federation, two engines, on real processes: a personalized federation with a training option, run by
``nearl-server`` and two warm ``nearl-client`` sites, and by ``simulation/run.py`` on the same virtual sites
with the same seeds, ends with the same adapters and metrics.

What it checks on the Deployment Engine: each site writes its personalized adapters, MLflow holds the sites'
personalized metrics (``<site>/personal_*``), and the audit trails show that the local groups (``oca-text``, ``gates``) never left.
Measured: the engines' final and personalized adapters are bit-identical (largest difference 0.0). Every input is
the same (config, sites, seeds); the replies may arrive in another order, but a weighted sum of two updates does not
depend on it.  With more sites the order of the float32 sums could matter; this federation has two.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from client.audit import read_lines
from nearl_core.demo_data import generate_demo_data
from nearl_core.personalize import group_of
from nearl_protocol import keys
from nearl_protocol import processes as flower
from tests.fed_helpers import Procs, dump, mlflow_run, nearl_client, nearl_server, wait_for

pytestmark = [pytest.mark.slow]

FLAGS = ["--rounds", "2", "--local-epochs", "1", "--personalize", "oca-text,gates", "--finetune-epochs", "1",
         "--set", "train.loss=logit-adjusted"]
LOCAL_GROUPS = {"oca-text", "gates"}
ATOL = 0.0  # measured: 0.0 (the test prints it)


def tensors(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(folder / "adapters.safetensors"))


def largest_difference(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    assert sorted(a) == sorted(b)
    return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)))) for k in a)


def simulate(tmp: Path, data: Path) -> Path:
    from simulation.run import main

    out = tmp / "sim"
    assert main(["--sites", "2", "--data", str(data), "--alpha", "iid", "--out", str(out),
                 "--mlflow-uri", f"sqlite:///{tmp / 'sim.db'}", *FLAGS]) == 0
    return out


def deploy(tmp: Path, sites: list[Path]) -> tuple[Procs, str]:
    procs = Procs(tmp / "logs")
    uri = f"sqlite:///{tmp / 'server.db'}"
    port = flower.free_port()
    nearl_server(procs, port, tmp, "--insecure", "--min-sites", "2", "--round-timeout", "600", "--wait-timeout",
                 "300", "--checkpoint-dir", str(tmp / "ck"), "--mlflow-uri", uri, *FLAGS)
    wait_for(procs, "server", "submitted", 300)
    for site in sites:
        nearl_client(procs, site.name, site, port, tmp, "--insecure", "--state-dir", str(tmp / f"state-{site.name}"))
    return procs, uri


@pytest.mark.timeout(1800)
def test_a_personalized_federation_is_the_same_on_nearl_server_and_in_the_simulation(tmp_path):
    generate_demo_data(tmp_path / "data", 2, train_per_site=24, val_per_site=8, test_per_site=8)
    sim = simulate(tmp_path, tmp_path / "data")
    sites = sorted((sim / "sites").iterdir())
    procs, uri = deploy(tmp_path, sites)
    try:
        assert procs.wait("server", 900) == 0, dump(procs)
    finally:
        procs.stop_all()
    client, run = mlflow_run(uri)
    personal = {k: v for k, v in run.data.metrics.items() if keys.MLFLOW_PERSONAL_PREFIX in k}
    for site in sites:
        assert f"{site.name}/{keys.MLFLOW_PERSONAL_PREFIX}accuracy" in personal, sorted(run.data.metrics)

    final_difference = largest_difference(tensors(tmp_path / "ck" / "final"), tensors(sim / "checkpoints" / "final"))
    personal_difference = {
        site.name: largest_difference(tensors(tmp_path / f"state-{site.name}" / "personalized"),
                                      tensors(sim / "site-state" / site.name / "personalized")) for site in sites}
    print(f"largest |difference| between the engines: final adapters {final_difference:.2e}, personalized "
          f"{personal_difference}")
    assert final_difference <= ATOL and max(personal_difference.values()) <= ATOL

    sim_client, sim_run = mlflow_run(f"sqlite:///{tmp_path / 'sim.db'}")
    for key, value in personal.items():
        assert sim_run.data.metrics[key] == pytest.approx(value, abs=1e-4), key

    for site in sites:
        lines = read_lines(tmp_path / f"state-{site.name}" / "audit.jsonl")
        sent = {name for line in lines if line["message_type"] == "train" for name, _, _ in line["arrays"]}
        assert sent, f"{site.name}: no train reply in its audit trail"
        assert {group_of(name) for name in sent} & LOCAL_GROUPS == set()
        assert not any(".gate." in f".{name}." for name in sent)
