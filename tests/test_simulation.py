"""`python simulation/run.py` end to end on Flower's Simulation Engine (real Ray, loopback only)."""

from __future__ import annotations

import csv
import json

import mlflow
import pytest

from nearl_core.demo_data import generate_demo_data
from server.events import RoundEvent, read_all, select
from simulation.run import main

pytestmark = pytest.mark.slow


def _read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _compare_run(tmp_path, name: str) -> tuple[list[dict], dict[str, dict[int, float]]]:
    """One small --compare run with a personalized arm: its results.csv rows and its MLflow metric histories."""
    out = tmp_path / name
    code = main(["--sites", "4", "--rounds", "1", "--local-epochs", "1", "--data", str(tmp_path / "pool"),
                 "--out", str(out), "--compare", "--personalize", "gates", "--finetune-epochs", "1"])
    assert code == 0
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    run = client.search_runs([client.get_experiment_by_name("nearl-federated").experiment_id],
                             order_by=["attributes.start_time DESC"])[0]
    timing = ("seconds", "bytes", "worker_")  # wall time and which process answered differ from run to run
    histories = {k: {m.step: m.value for m in client.get_metric_history(run.info.run_id, k)}
                 for k in run.data.metrics if not any(t in k for t in timing)}
    return _read_csv(out / "results.csv"), histories


def test_default_run_with_compare_writes_every_arm_and_repeats_bit_for_bit(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default MLflow store is ./mlflow.db
    generate_demo_data(tmp_path / "pool", 2, train_per_site=40, val_per_site=10, test_per_site=10)
    rows, metrics = _compare_run(tmp_path, "run")
    out = tmp_path / "run"
    assert list(rows[0]) == ["arm", "site", "accuracy", "balanced_accuracy", "macro_f1", "auroc"]
    arms = {r["arm"] for r in rows}
    assert arms == {"zero-shot", "federated", "centralized", "local-only", "personalized"}
    for arm in arms:
        sites = {r["site"] for r in rows if r["arm"] == arm}
        assert sites == {"site1", "site2", "site3", "site4", "mean"}
    assert "| personalized | mean |" in (out / "results.md").read_text()
    assert (out / "curves.png").stat().st_size > 1000
    for site in ("site1", "site4"):  # each virtual site wrote its own personalized adapters
        assert (out / "site-state" / site / "personalized" / "adapters.json").is_file()
    partition = json.loads((out / "partition.json").read_text())
    assert [s["site"] for s in partition["sites"]] == ["site1", "site2", "site3", "site4"]
    assert "compare/centralized/mean/accuracy" in metrics and "site3/eval_accuracy" in metrics
    assert "site3/personal_accuracy" in metrics
    again_rows, again_metrics = _compare_run(tmp_path, "again")  # same command, same seed
    assert again_rows == rows
    assert again_metrics == metrics


def test_fifty_virtual_sites_complete(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    generate_demo_data(tmp_path / "pool", 4, train_per_site=40, val_per_site=10, test_per_site=10)
    out = tmp_path / "run50"
    code = main(["--sites", "50", "--rounds", "1", "--local-epochs", "1", "--alpha", "iid",
                 "--data", str(tmp_path / "pool"), "--out", str(out)])
    assert code == 0
    rounds = select(read_all(out / "flower" / "progress.jsonl"), RoundEvent)
    assert len(rounds) == 1 and len(rounds[0].answered) == 50
    rows = _read_csv(out / "results.csv")
    assert len([r for r in rows if r["arm"] == "federated"]) == 51  # 50 sites + mean


def test_dp_simulation_on_the_timm_bert_layout_accounts_per_site_and_stops_at_a_sites_ceiling(tmp_path,
                                                                                            monkeypatch):
    """--dp-epsilon 2 over 2 rounds; site2's own ceiling 1.8 lets it train round 1 only (~1.4 spent).

    On BiomedCLIP's tower layout (a timm ViT and a Hugging Face BERT, tiny): every Ray worker
    builds that backbone itself from the shipped config (the tiny timm ViT registered in each
    process, the BERT config and tokenizer as JSON files inside the package).
    """
    from nearl_core.privacy import PrivacyState, epsilon_of

    monkeypatch.chdir(tmp_path)
    generate_demo_data(tmp_path / "pool", 2, train_per_site=40, val_per_site=10, test_per_site=10)
    out = tmp_path / "dp"
    code = main(["--config", "tiny-timm-bert", "--sites", "2", "--rounds", "2", "--local-epochs", "1", "--alpha",
                 "iid", "--data", str(tmp_path / "pool"), "--out", str(out), "--dp-epsilon", "2",
                 "--site-max-epsilon", "site2=1.8"])
    assert code == 0
    rounds = select(read_all(out / "flower" / "progress.jsonl"), RoundEvent)
    assert [r.answered for r in rounds] == [["site1", "site2"], ["site1"]]  # the federation went on without it
    assert list(rounds[1].declined) == ["site2"] and not rounds[1].rejected

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    run = client.search_runs([client.get_experiment_by_name("nearl-federated").experiment_id])[0]
    hist = lambda key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}  # noqa: E731
    assert run.data.params["dp_delta"] == "1e-05" and run.data.tags["nearl.backbone"] == "nearl-tiny-timm-bert"
    for site in ("site1", "site2"):  # the reported epsilon is what Opacus gives for the site's own ledger
        ledger = PrivacyState.load(out / "site-state" / site)
        assert hist(f"{site}/epsilon")[2] == pytest.approx(epsilon_of(ledger.history, 1e-5), rel=1e-9)
        assert hist(f"{site}/dp_noise_multiplier")[2] == ledger.noise_multiplier
        assert hist(f"{site}/dp_sample_rate")[1] == ledger.sample_rate
    assert hist("site1/dp_steps")[2] == 2 * hist("site1/dp_steps")[1]
    assert hist("site2/dp_steps")[2] == hist("site2/dp_steps")[1]  # declined: no step spent
    assert hist("site2/epsilon")[2] <= 1.8 < hist("site1/epsilon")[2] <= 2.0 + 1e-9
    assert hist("epsilon_max") == {1: pytest.approx(hist("site1/epsilon")[1]), 2: hist("site1/epsilon")[2]}
    assert hist("sites_declined") == {1: 0.0, 2: 1.0}
