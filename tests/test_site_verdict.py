"""The site's verdict (client/verdict.py, client/local_baseline.py, client/site_report.py) without
processes: the table, the JSON, the cache key, and the job a run's last evaluate leaves (the rows it
measured, a local-only model trained once and then reused)."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest

from client import site_report
from client.local_baseline import cache_key, data_digest
from client.verdict import Row, Verdict, measured_rows, render_markdown, render_table, run_totals
from nearl_core.data import scan_site

QUIET = lambda *a, **k: None  # noqa: E731


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    """One small site (12 training images): the in-process jobs below train and evaluate on it."""
    from nearl_core.demo_data import generate_demo_data

    root = tmp_path_factory.mktemp("small")
    generate_demo_data(root, 1, train_per_site=12, val_per_site=6, test_per_site=6, seed=0)
    return root


def verdict(**extra) -> Verdict:
    rows = [Row("local-only", 0.5, 0.45, 0.4, 0.7, 8), Row("federated", 0.625, 0.6, 0.55, math.nan, 8),
            Row("zero-shot", 0.25, 1 / 3, 0.2, 0.5, 8)]
    return Verdict("42", "site1", 1.7e9, "test", rows, None, 2_500_000, 1200, 3.25,
                   {"rounds": 2, "local_baseline": {"status": "reused", "epochs": 2, "folder": "/s/local-baseline/k",
                                                    "epsilon": None}, **extra})


def test_the_table_orders_the_models_and_marks_a_missing_metric():
    table = render_table(verdict().rows).splitlines()
    assert table[0] == "| model | accuracy | balanced accuracy | macro F1 | AUROC | images |"
    assert [line.split("|")[1].strip() for line in table[2:]] == ["zero-shot", "federated", "local-only"]
    assert table[3] == "| federated | 0.625 | 0.600 | 0.550 | - | 8 |"


def test_the_markdown_states_the_gains_the_costs_and_that_nothing_left():
    text = render_markdown(verdict())
    assert text.startswith("# Site verdict: site1, run 42\n")
    assert "- federated: balanced accuracy +0.150 vs local-only, +0.267 vs zero-shot\n" in text
    assert "- personalized:" not in text  # this run did not personalize
    assert "one image moves accuracy by 0.125" in text
    assert "no differential privacy in this run" in text and "sent 2.50 MB, received 1.2 kB" in text
    assert "reused from an earlier run" in text and "nothing of this report was sent to the coordinator" in text
    dp = render_markdown(Verdict("1", "s", 0.0, "val", [], 1.2345, 0, 0, 0.0,
                                 {"local_baseline": {"status": "skipped", "reason": "nearl-client --no-local-baseline"}}))
    assert "epsilon spent: 1.234 (this site's DP ledger" in dp and "not trained (nearl-client --no-local-baseline)" in dp


def test_the_json_keeps_the_agreed_keys_and_writes_null_for_a_missing_metric():
    out = verdict().to_dict()
    assert list(out)[:9] == ["run_id", "site", "time", "split", "rows", "epsilon_spent", "bytes_sent",
                             "bytes_received", "compute_seconds"]
    assert set(out["rows"][0]) == {"model", "accuracy", "balanced_accuracy", "macro_f1", "auroc", "examples"}
    assert out["rows"][1]["auroc"] is None and json.loads(json.dumps(out, allow_nan=False)) == out


def test_rows_come_from_the_final_reply_test_split_first_and_personalized_when_present():
    metrics = {"test-accuracy": 0.5, "test-balanced-accuracy": 0.4, "test-macro-f1": 0.3, "test-auroc": 0.6,
               "test-examples": 8, "eval-accuracy": 0.9, "num-examples": 6, "personal-accuracy": 0.75,
               "personal-balanced-accuracy": 0.7, "personal-macro-f1": 0.6, "personal-auroc": 0.8,
               "personal-examples": 8}
    assert measured_rows(metrics) == [Row("federated", 0.5, 0.4, 0.3, 0.6, 8), Row("personalized", 0.75, 0.7, 0.6, 0.8, 8)]
    val_only = {"eval-accuracy": 0.9, "eval-balanced-accuracy": 0.8, "eval-macro-f1": 0.7, "num-examples": 6}
    (row,) = measured_rows(val_only)
    assert row.examples == 6 and row.accuracy == 0.9 and math.isnan(row.auroc)


def test_run_totals_count_only_that_runs_lines():
    lines = [{"run_id": 7, "bytes_sent": 10, "bytes_received": 100, "seconds": 1.5},
             {"run_id": 8, "bytes_sent": 99, "bytes_received": 99, "seconds": 9.0},
             {"run_id": 7, "bytes_sent": 5, "bytes_received": 50, "seconds": None}]  # an old line: no seconds
    assert run_totals(lines, 7) == (15, 150, 1.5)


def test_the_cache_key_follows_the_training_data_and_config_but_not_the_federation_section(small_root, tmp_path):
    site_dir = tmp_path / "site1"
    shutil.copytree(small_root / "site1", site_dir)
    classes = ("normal", "nodule", "opacity")
    digest = data_digest(scan_site(site_dir, classes))
    assert digest == data_digest(scan_site(site_dir, classes))  # a re-scan of the same files
    config = {"train": {"lr": 0.003}, "federation": {"finetune-epochs": 1}}
    key = cache_key(digest, config, epochs=2, backbone="b")
    assert key == cache_key(digest, {**config, "federation": {"finetune-epochs": 5}}, epochs=2, backbone="b")
    assert len({key, cache_key(digest, {"train": {"lr": 0.01}}, epochs=2, backbone="b"),
                cache_key(digest, config, epochs=3, backbone="b"), cache_key(digest, config, epochs=2, backbone="c"),
                cache_key(digest, config, epochs=2, backbone="b", dp_ceiling=3.0)}) == 5
    image = sorted((site_dir / "train").rglob("*.png"))[0]
    os.utime(image, ns=(0, 12345))  # replaced or touched: another file as far as the key knows
    touched = data_digest(scan_site(site_dir, classes))
    assert touched != digest
    sorted((site_dir / "test").rglob("*.png"))[0].unlink()  # the test split is measured afresh every run
    assert data_digest(scan_site(site_dir, classes)) == touched


def _final_evaluate(root, state, cfg, jobs):
    """The run's last evaluate message at site1 (as test_personalize sends it), with a runner that keeps the job."""
    from flwr.app import Context, RecordDict

    from client.task import evaluate_reply
    from nearl_core.adapter_io import shared_state
    from nearl_core.model import build_model
    from nearl_protocol.messages import instruction_config
    from tests.fed_helpers import flat_record, instruction

    model = build_model(cfg)
    config = instruction_config(nearl_config=cfg.to_dict(), transport="float32", backbone="", local_epochs=1,
                                total_rounds=2)
    config["server-round"] = 2
    msg = instruction(RecordDict({"arrays": flat_record({k: v.contiguous() for k, v in shared_state(model).items()}),
                                  "config": config}), message_type="evaluate")
    ctx = Context(run_id=1, node_id=1, state=RecordDict(), run_config={},
                  node_config={"site": "site1", "data-path": str(root / "site1"), "state-dir": str(state)})
    site_report.use_runner(jobs.append)
    try:
        return evaluate_reply(msg, ctx, log=QUIET)
    finally:
        site_report.use_runner(None)


def test_the_last_evaluate_leaves_a_job_whose_verdict_reuses_the_local_model_it_trained(small_root, tmp_path):
    from nearl_core.config import load_config
    from nearl_protocol.messages import metrics_of

    cfg = load_config("demo", {"federation.finetune-epochs": 1})
    state, jobs, lines = tmp_path / "state", [], []
    reply = _final_evaluate(small_root, state, cfg, jobs)
    (job,) = jobs
    path = site_report.run_job(job, lines.append)
    out = json.loads(path.read_text())
    assert path == state / "reports" / f"{job.run_id}.json" and path.with_suffix(".md").is_file()
    assert [r["model"] for r in out["rows"]] == ["zero-shot", "federated", "personalized", "local-only"]
    sent = metrics_of(reply.content)
    fed = out["rows"][1]
    assert fed["accuracy"] == pytest.approx(sent["test-accuracy"]) and fed["examples"] == sent["test-examples"] == 6
    assert out["split"] == "test" and out["epsilon_spent"] is None and out["sent_to_coordinator"] is False
    assert out["bytes_received"] > 0 and out["bytes_sent"] > 0 and out["compute_seconds"] > 0
    base = out["local_baseline"]
    assert base["status"] == "trained" and base["epochs"] == 2 and any("trained 2 epoch(s)" in x for x in lines)
    from safetensors.numpy import load_file

    weights = load_file(str(Path(base["folder"]) / "adapters.safetensors"))
    zero = out["rows"][0]
    assert any(abs(v).max() > 0 for k, v in weights.items() if ".gate" in k) or \
        out["rows"][3]["accuracy"] != zero["accuracy"]  # it trained: the zero-init gates moved

    again = site_report.run_job(job, lines.append)  # the same data and config: the cache answers
    assert json.loads(again.read_text())["local_baseline"]["status"] == "reused"
    assert json.loads(again.read_text())["rows"][3] == out["rows"][3]
    assert any("local-only baseline: reused" in x for x in lines)


def test_a_cold_sites_job_file_without_local_baseline_gives_the_other_rows(small_root, tmp_path):
    """What a cold site's detached process does (client/app.py: site_report.spawn), in this process."""
    from nearl_core.config import load_config

    cfg = load_config("demo", {"federation.finetune-epochs": 0})
    jobs: list = []
    _final_evaluate(small_root, tmp_path / "state", cfg, jobs)
    (job,) = jobs
    job.binding["local_baseline"] = False  # nearl-client --no-local-baseline
    path = site_report.write_job(job)
    assert site_report.main([str(path)]) == 0 and not path.exists()
    out = json.loads((tmp_path / "state" / "reports" / f"{job.run_id}.json").read_text())
    assert [r["model"] for r in out["rows"]] == ["zero-shot", "federated"]
    assert out["local_baseline"]["status"] == "skipped"
    assert not (tmp_path / "state" / "local-baseline").exists()
    assert site_report._runner is None  # a plain call of the handler (the simulation, other tests) leaves no job


def test_no_local_baseline_reaches_the_site_through_its_node_config():
    from client.binding import site_binding
    from client.cli import build_parser

    base = ["--site", "site1", "--data", "/data/site1"]
    assert build_parser().parse_args(base).local_baseline is True
    assert build_parser().parse_args([*base, "--no-local-baseline"]).local_baseline is False
    node = {"site": "site1", "data-path": "/data/site1"}
    assert site_binding(node).local_baseline is True
    assert site_binding({**node, "local-baseline": False}).local_baseline is False
    assert site_binding({**node, "local-baseline": "false"}).local_baseline is False


def test_under_dp_the_local_model_has_its_own_ledger_within_the_runs_epsilon_or_is_skipped(small_root, tmp_path):
    from client.local_baseline import local_only
    from client.task import cached_site
    from nearl_core.config import load_config
    from nearl_core.privacy import PrivacyState
    from torch import device

    cpu = device("cpu")
    cfg = load_config("demo", {"privacy.enabled": True, "privacy.target-epsilon": 4.0, "train.device": "cpu"})
    site = cached_site(small_root / "site1", cfg.task.classes)
    state = tmp_path / "state"
    base = local_only(cfg, site, cpu, state_dir=state, key="k", epochs=1, max_epsilon=None, log=QUIET)
    assert base.status == "trained" and 0 < base.epsilon <= 4.0 + 1e-6
    assert PrivacyState.load(base.folder).epsilon == pytest.approx(base.epsilon)  # its own ledger, in its cache
    assert PrivacyState.load(state) is None  # the site's ledger (the federation's steps) is not touched
    strict = load_config("demo", {"privacy.enabled": True, "privacy.noise-multiplier": 0.5, "train.device": "cpu"})
    lines: list[str] = []
    none = local_only(strict, site, cpu, state_dir=state, key="k2", epochs=2, max_epsilon=0.01, log=lines.append)
    assert none.status == "skipped" and none.model is None and "0.01" in none.reason, none.reason
    assert not (state / "local-baseline" / "k2").exists() and not (state / "local-baseline" / ".k2.training").exists()
