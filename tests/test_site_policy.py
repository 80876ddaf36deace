"""A site's own policy, in process: the file, the start-up checks, and one refusal per rule by the warm worker.

The worker is handed crafted instructions (no SuperNode).  Its node config points at a data
folder that does not exist, so a message the policy let through would fail on the data:
every refusal below is given before any data is read.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from flwr.app import ConfigRecord, Context, Message, RecordDict

from client import flower_internals as fi
from client.approvals import RunBook
from client.policy import PolicyError, SitePolicy, load_policy, parse_policy
from client.worker import Worker
from nearl_core.config import load_config
from nearl_protocol import keys
from nearl_protocol import secagg as sa
from nearl_protocol.messages import REFUSAL_CODE, adapter_record, instruction_config, read_reply
from tests.fed_helpers import instruction, metadata
from tests.test_warm_site import fab

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "deploy" / "site-policy.example.yaml"


def test_the_example_policy_parses_and_names_every_key():
    policy = load_policy(EXAMPLE)
    assert policy.approval == "manual" and policy.methods == ("nearl", "coop", "clip-adapter")
    keys_in_file = set(yaml.safe_load(EXAMPLE.read_text()))
    assert keys_in_file == set(SitePolicy().to_dict()), "the example documents every policy key"


@pytest.mark.parametrize("raw, expected", [
    ({"max-round": 3}, "unknown key 'max-round'; known keys:"),
    ({"methods": ["nearl", "magic"]}, "methods names 'magic', not an adapter method"),
    ({"methods": []}, "methods must be a list of adapter methods"),
    ({"max-rounds": "ten"}, "max-rounds must be a whole number >= 1, got 'ten'"),
    ({"max-local-epochs": 0}, "max-local-epochs must be a whole number >= 1"),
    ({"max-finetune-epochs": -1}, "max-finetune-epochs must be a whole number >= 0"),
    ({"require-dp": "yes"}, "require-dp must be true or false"),
    ({"min-secure-sites": 1}, "min-secure-sites must be a whole number >= 2"),
    ({"max-reply-bytes": True}, "max-reply-bytes must be a whole number >= 1"),
    ({"coordinator-ca-sha256": "abc"}, "coordinator-ca-sha256 must be 64 hex digits"),
    ({"approval": "sometimes"}, "approval must be auto or manual"),
])
def test_an_unknown_key_or_a_bad_value_is_one_line_naming_it(raw, expected):
    with pytest.raises(PolicyError) as err:
        parse_policy(raw, "site policy p.yaml")
    assert expected in str(err.value) and "\n" not in str(err.value)


def client_args(site_dir: Path, tmp: Path, *extra: str) -> list[str]:
    return ["--site", "siteA", "--data", str(site_dir), "--insecure", "--state-dir", str(tmp / "state"),
            "--check-only", *extra]


@pytest.mark.parametrize("policy, extra, expected", [
    ({"max-rounds": 0}, (), "max-rounds must be a whole number >= 1"),
    ({"approval": "manual"}, ("--cold",), "--policy needs the warm site worker"),
    ({"coordinator-ca-sha256": "0" * 64}, (), "--insecure uses no CA; pass --certs DIR"),
])
def test_nearl_client_stops_at_start_in_one_line_with_exit_2(tmp_path, demo_root, capsys, policy, extra, expected):
    from client.cli import main

    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy))
    assert main(client_args(demo_root / "site1", tmp_path, "--policy", str(path), *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1, err


def test_the_coordinator_ca_pin_is_checked_against_the_certs_ca(tmp_path, demo_root, capsys):
    from client.cli import main

    certs = tmp_path / "certs"
    certs.mkdir()
    (certs / "ca.crt").write_text("not really a certificate\n")
    good = hashlib.sha256((certs / "ca.crt").read_bytes()).hexdigest()
    args = [a for a in client_args(demo_root / "site1", tmp_path) if a != "--insecure"] + ["--certs", str(certs)]
    for pin, code in ((good, 0), ("1" * 64, 2)):
        (tmp_path / "p.yaml").write_text(yaml.safe_dump({"coordinator-ca-sha256": pin}))
        assert main([*args, "--policy", str(tmp_path / "p.yaml")]) == code
    err = capsys.readouterr().err
    assert f"has sha256 {good}, not the coordinator-ca-sha256 of the site policy" in err
    facts = json.loads((tmp_path / "state" / "site.json").read_text())  # the console's view of the data
    assert facts["site"] == "siteA" and facts["counts"]["train"] and facts["policy"]["coordinator-ca-sha256"] == good


# -- the worker's refusals ---------------------------------------------------------------------------------
ACCEPTED_FAB = fab()


def policy_worker(tmp_path: Path, **policy) -> Worker:
    spec = {"site": "siteA", "runtime_address": "127.0.0.1:1", "accepted_fabs": [fi.fab_sha256(ACCEPTED_FAB)],
            "task_file": str(tmp_path / "runtime" / "task.json"), "config": "demo", "data": str(tmp_path / "none"),
            "state_dir": str(tmp_path / "state"), "coordinator": "127.0.0.1:9",
            "policy": parse_policy(policy).to_dict() if policy else None}
    return Worker(spec)


def train_task(tmp_path: Path, *, run_id: int = 5, kind: str = "train", rounds: int = 3, epochs: int = 1,
               arrays: int = 0, secagg: dict | None = None, **cfg_sections) -> fi.TaskInput:
    """A message as the worker pulls it: the demo config with ``cfg_sections`` changed, no data needed."""
    raw = load_config("demo").to_dict()
    for section, values in cfg_sections.items():
        raw[section].update(values)
    records = {keys.CONFIG: instruction_config(nearl_config=raw, transport="float32", backbone="",
                                               local_epochs=epochs, total_rounds=rounds)}
    records[keys.CONFIG][keys.SERVER_ROUND] = 1
    if arrays:
        records[keys.ARRAYS] = adapter_record(np.zeros(arrays, np.float32))
    if secagg is not None:
        records[keys.SECAGG] = ConfigRecord(secagg)
    return task_of(tmp_path, Message(content=RecordDict(records), metadata=metadata(kind, run_id=run_id)))


def task_of(tmp_path: Path, msg) -> fi.TaskInput:
    node = {"site": "siteA", "data-path": str(tmp_path / "none"), "state-dir": str(tmp_path / "state"),
            "coordinator": "127.0.0.1:9"}
    context = Context(run_id=msg.metadata.run_id, node_id=1, node_config=node, state=RecordDict(), run_config={})
    return fi.TaskInput(msg, context, fi.fab_sha256(ACCEPTED_FAB), ACCEPTED_FAB, "nearl/nearl-federated", "1")


def refused(worker: Worker, task: fi.TaskInput) -> str:
    reply, ok, _ = worker.answer(task)
    assert ok and reply.has_error() and reply.error.code == REFUSAL_CODE, reply
    got = read_reply(reply)
    assert got.claimed_site == "siteA"
    return got.error


def audit_lines(tmp_path: Path) -> list[dict]:
    return [json.loads(x) for x in (tmp_path / "state" / "audit.jsonl").read_text().splitlines()]


RULES = [  # policy, message, the refusal's words
    ({"methods": ["coop"]}, {}, "adapter.method 'nearl' is not one this site allows (coop)"),
    ({"max-rounds": 2}, {"rounds": 3}, "3 rounds asked, this site agrees to at most 2"),
    ({"max-local-epochs": 1}, {"epochs": 2}, "2 local epochs per round asked, this site agrees to at most 1"),
    ({"max-finetune-epochs": 0}, {"federation": {"finetune-epochs": 1}}, "federation.finetune-epochs 1 asked"),
    ({"require-dp": True}, {}, "the run trains without differential privacy"),
    ({"require-secure-aggregation": True}, {}, "the round has no secure aggregation"),
    ({"max-reply-bytes": 1000}, {"arrays": 500}, "bytes, this site sends at most 1,000 (max-reply-bytes)"),
]


@pytest.mark.parametrize("policy, message, expected", RULES, ids=[next(iter(r[0])) for r in RULES])
def test_each_rule_refuses_before_any_data_is_read(tmp_path, capsys, policy, message, expected):
    worker = policy_worker(tmp_path, **policy)
    why = refused(worker, train_task(tmp_path, **message))
    assert why.startswith(f"{keys.SITE_POLICY}: ") and expected in why, why
    assert expected in capsys.readouterr().out  # the site's log
    (line,) = audit_lines(tmp_path)
    assert expected in line["refused"] and line["bytes_sent"] == 0 and line["arrays"] == []
    run = RunBook(tmp_path / "state").get(5)
    assert run["status"] == "refused" and run["by"] == "policy" and expected in run["reason"]


def test_a_secure_sum_of_too_few_sites_is_refused_at_key_setup_and_before_unmasking(tmp_path):
    worker = policy_worker(tmp_path, **{"min-secure-sites": 3})
    setup = {keys.SECAGG_STAGE: sa.SETUP, keys.SERVER_ROUND: 1, keys.SECAGG_INDEX: 1,
             **sa.Params(2, 2, 0.05, 1000).to_config()}
    msg = instruction(RecordDict({keys.SECAGG: ConfigRecord(setup)}), keys.SECAGG_MESSAGE_TYPE)
    assert "the secure sum would hold 2 sites (sites sampled)" in refused(worker, task_of(tmp_path, msg))
    unmask = {keys.SECAGG_STAGE: sa.UNMASK, keys.SERVER_ROUND: 1, keys.SECAGG_ACTIVE: [1, 2], keys.SECAGG_DEAD: [3]}
    msg = instruction(RecordDict({keys.SECAGG: ConfigRecord(unmask)}), keys.SECAGG_MESSAGE_TYPE)
    assert "2 sites (sites still in the round)" in refused(worker, task_of(tmp_path, msg))
    collect = {keys.SECAGG_STAGE: sa.COLLECT, keys.SERVER_ROUND: 1, keys.SECAGG_PARTICIPANTS: [2],
               keys.SECAGG_CIPHERTEXTS: [b"x"]}
    assert "(its mask partners and itself)" in refused(worker, train_task(tmp_path, secagg=collect))


def test_a_coordinator_that_changes_the_config_mid_run_meets_the_policy_again(tmp_path):
    worker = policy_worker(tmp_path, methods=["nearl"], approval="auto")
    gate = worker.gate
    assert gate.problem(train_task(tmp_path).message) is None  # within the policy: it would train
    assert RunBook(tmp_path / "state").get(5)["status"] == "accepted"
    why = refused(worker, train_task(tmp_path, adapter={"method": "lora"}))  # the same run, round 2's config
    assert "adapter.method 'lora' is not one this site allows" in why


def test_without_a_policy_the_worker_has_no_gate():
    assert policy_worker(Path("/nonexistent")).gate is None


def test_a_reply_larger_than_the_policy_allows_never_leaves():
    from client.egress import EgressError, check_reply_size

    content = RecordDict({keys.ARRAYS: adapter_record(np.zeros(300, np.float32))})
    check_reply_size(content, None)
    check_reply_size(content, 2000)
    with pytest.raises(EgressError, match=r"holds 1,\d{3} bytes, this site sends at most 1,000"):
        check_reply_size(content, 1000)


def test_the_coordinators_round_line_shows_a_sites_own_say_as_such():
    from server.events import RoundEvent
    from server.progress_view import format_round

    event = RoundEvent(time=1.0, round=1, rounds=3, answered=["site1"], missing=["site2", "site3"],
                       rejected={"site2": "waiting for approval (config sha256 0123456789ab; ...)",
                                 "site3": "nan values"}, declined={}, sampled=3, aggregated=True, not_applied="",
                       payload_sha256={}, seconds=1.0, bytes_sent=1, bytes_received=1, train={}, eval_step=None,
                       eval={}, checkpoint=None)
    text = format_round(event)
    assert "\n    site2: waiting for approval (config sha256" in text and "\n    rejected site3: nan values" in text

