"""A federation round on the timm + Hugging Face layout (BiomedCLIP's), on Flower's Simulation Engine.

Every Ray worker builds the backbone itself from the shipped config: the tiny timm ViT is
registered in each process, the BERT config and tokenizer are JSON files inside the
package (the only data files Flower's app bundle carries), and random init is seeded.
"""

from __future__ import annotations

import csv
import json

import mlflow
import pytest

from nearl_core.demo_data import generate_demo_data
from simulation.run import main

pytestmark = pytest.mark.slow


def test_one_round_two_sites_on_timm_bert(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default MLflow store is ./mlflow.db
    generate_demo_data(tmp_path / "pool", 2, train_per_site=24, val_per_site=8, test_per_site=8)
    out = tmp_path / "run"
    code = main(["--config", "tiny-timm-bert", "--sites", "2", "--rounds", "1", "--local-epochs", "1",
                 "--data", str(tmp_path / "pool"), "--out", str(out)])
    assert code == 0
    events = [json.loads(line) for line in (out / "flower" / "progress.jsonl").read_text().splitlines()]
    rounds = [e for e in events if e["event"] == "round"]
    assert len(rounds) == 1 and len(rounds[0]["answered"]) == 2  # both sites trained and replied
    with open(out / "results.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["arm"] == "federated"]
    assert {r["site"] for r in rows} == {"site1", "site2", "mean"}
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("nearl-federated").experiment_id])
    assert [r.data.tags["nearl.backbone"] for r in runs] == ["nearl-tiny-timm-bert"]
