"""Manual approval, in process: a run waits, a person approves or refuses it, every decision is audited.

The worker answers crafted instructions (tests/test_site_policy.py's helpers); a message the
gate lets through is not run (it would train), the gate's verdict is asked directly.
"""

from __future__ import annotations

import json

import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from client.approvals import RunBook, approve, asked_sha256, refuse
from client.audit import summarise
from client.cli import main
from nearl_core.errors import NearlError
from nearl_protocol import keys
from nearl_protocol import secagg as sa
from tests.fed_helpers import metadata
from tests.test_site_policy import audit_lines, policy_worker, refused, task_of, train_task


def cli(*argv: str) -> int:
    return main(list(argv))


def test_a_run_waits_for_approval_then_trains_and_a_changed_config_waits_again(tmp_path, capsys):
    state = str(tmp_path / "state")
    worker = policy_worker(tmp_path, approval="manual")
    why = refused(worker, train_task(tmp_path, run_id=42))
    assert why.startswith("waiting for approval (config sha256 ") and "nearl-client approve 42" in why
    run = RunBook(tmp_path / "state").get(42)
    assert run["status"] == "pending" and run["asked"]["total-rounds"] == 3 and run["differs_from"] is None
    assert run["config_sha256"] == asked_sha256(run["asked"])

    assert cli("approvals", "--state-dir", state) == 0
    out = capsys.readouterr().out
    assert "run 42 from 127.0.0.1:9: pending - waiting for approval" in out
    assert 'adapter.method = "nearl"' in out and "no config approved before at this site" in out

    assert cli("approve", "42", "--state-dir", state) == 0
    assert f"run 42: approved config sha256 {run['config_sha256']}" in capsys.readouterr().out
    assert worker.gate.problem(train_task(tmp_path, run_id=42).message) is None  # round 2 trains
    assert RunBook(tmp_path / "state").get(42)["status"] == "approved"

    why = refused(worker, train_task(tmp_path, run_id=42, train={"lr": 0.5}))  # the coordinator changes its mind
    assert why.startswith("waiting for approval")
    assert cli("approvals", "--state-dir", state) == 0
    out = capsys.readouterr().out
    assert "differs from the last approved config (run 42):" in out and "train.lr:" in out and "-> 0.5" in out

    assert cli("refuse", "42", "--reason", "we agreed to lr 0.001", "--state-dir", state) == 0
    why = refused(worker, train_task(tmp_path, run_id=42))  # even the approved config: the run is refused
    assert why == f"{keys.REFUSED_BY_SITE}: we agreed to lr 0.001"
    decisions = [x for x in audit_lines(tmp_path) if x.get("decision")]
    assert [(d["decision"], d["run_id"], d["by"]) for d in decisions] == [
        ("approved", 42, "nearl-client approve"), ("refused", 42, "nearl-client refuse")]
    assert decisions[0]["config_sha256"] == run["config_sha256"] and decisions[1]["reason"] == "we agreed to lr 0.001"
    (summary,) = summarise(audit_lines(tmp_path))  # decisions are not messages
    assert summary["messages"] == 3 and len(summary["refusals"]) == 3


def test_decisions_that_cannot_be_taken_are_one_line_errors(tmp_path, capsys):
    state = str(tmp_path / "state")
    assert cli("approve", "7", "--state-dir", state) == 2
    assert "run 7 is unknown at this site" in capsys.readouterr().err
    worker = policy_worker(tmp_path, approval="auto")
    assert worker.gate.problem(train_task(tmp_path, run_id=7).message) is None
    assert cli("approve", "7", "--state-dir", state) == 2
    assert "run 7 is not waiting for approval (it is accepted)" in capsys.readouterr().err
    with pytest.raises(NearlError, match="give the reason"):
        refuse(tmp_path / "state", "7", "   ")
    with pytest.raises(SystemExit):
        cli("refuse", "7", "--state-dir", state)  # --reason is required
    assert cli("approvals", "--state-dir", state) == 0 and "no run is waiting" in capsys.readouterr().out
    assert cli("approvals", "--all", "--json", "--state-dir", state) == 0
    (run,) = json.loads(capsys.readouterr().out)
    assert run["status"] == "accepted" and run["by"] == "auto"


def test_a_second_run_shows_what_differs_from_the_last_approved_config(tmp_path):
    worker = policy_worker(tmp_path, approval="manual")
    refused(worker, train_task(tmp_path, run_id=1))
    approve(tmp_path / "state", "1")
    refused(worker, train_task(tmp_path, run_id=2, rounds=5, adapter={"rank": 8}))
    diff = RunBook(tmp_path / "state").get(2)["differs_from"]
    assert diff["run_id"] == "1" and sorted(k for k, _, _ in diff["changes"]) == ["adapter.rank", "total-rounds"]


def secagg_message(run_id: int, stage: str) -> Message:
    setup = {keys.SECAGG_STAGE: stage, keys.SERVER_ROUND: 1, keys.SECAGG_INDEX: 1, **sa.Params(3, 2, 0.05, 10).to_config()}
    return Message(content=RecordDict({keys.SECAGG: ConfigRecord(setup)}),
                   metadata=metadata(keys.SECAGG_MESSAGE_TYPE, run_id=run_id))


def test_secure_key_setup_passes_for_a_new_run_and_is_refused_while_it_waits(tmp_path):
    """Key setup carries no config: a new run's passes (its collect stage carries the config and is judged),
    a run that waits for approval sits its rounds out from key setup on."""
    worker = policy_worker(tmp_path, approval="manual")
    assert worker.gate.problem(secagg_message(9, sa.SETUP)) is None
    refused(worker, train_task(tmp_path, run_id=9))
    why = refused(worker, task_of(tmp_path, secagg_message(9, sa.SETUP)))
    assert why.startswith("waiting for approval")
    approve(tmp_path / "state", "9")
    assert worker.gate.problem(secagg_message(9, sa.SETUP)) is None
