"""``nearl-client verify`` (client/verify.py) against a record held in memory: each attributed round
matched, the first unsent one named, the summary; bad input in one line with exit 2.  The real
record of a real federation: tests/test_personalized_e2e.py."""

from __future__ import annotations

import json

from client import verify
from nearl_protocol import keys


def _record(hashes: dict[int, str], **tags) -> verify.Record:
    return verify.Record("nearl-adapters version 3", "run-1",
                         {**{keys.payload_tag(r, "site1"): h for r, h in hashes.items()},
                          keys.payload_tag(1, "site2"): "other", **tags}, {"rounds": "3", "strategy": "fedavg"})


LINES = [{"run_id": 9, "round": 1, "site": "site1", "payload_sha256": "aa", "refused": None, "epsilon_after": None},
         {"run_id": 9, "round": 2, "site": "site1", "payload_sha256": "bb", "refused": None, "epsilon_after": None},
         {"run_id": 9, "round": 3, "site": "site1", "payload_sha256": "cc", "refused": None, "epsilon_after": None},
         {"run_id": 9, "round": 3, "site": "site1", "payload_sha256": None, "refused": None},  # an evaluate reply
         # a rerun with the same config and seeds: its first update is bit-identical to run 9's
         {"run_id": 10, "round": 1, "site": "site1", "payload_sha256": "aa", "refused": None, "epsilon_after": None},
         {"run_id": 10, "round": 2, "site": "site1", "payload_sha256": "dd", "refused": None, "epsilon_after": None}]


def test_verify_matches_each_attributed_round_and_names_the_first_it_never_sent(tmp_path):
    sent = verify.sent_updates(LINES)
    honest = _record({1: "aa", 2: "bb"}, **{keys.round_tag(2, "not_applied"): "too far"})
    assert honest.attributed("site1") == {1: "aa", 2: "bb"} and verify.first_unsent(honest.attributed("site1"), sent) is None
    text = verify.summary(honest, "site1", tmp_path / "audit.jsonl", honest.attributed("site1"), sent, None)
    assert "OK: every update the coordinator attributes to site1 is one this site sent" in text
    assert "contributed    1 of 3 rounds: 1" in text and "not applied    2" in text and "sent, unused   3" in text
    assert "not differentially private" in text and len(text.splitlines()) <= 12
    assert "(Flower run 9)" in text  # the run that sent both updates, not the rerun that sent the first one too
    forged = _record({1: "aa", 2: "aa"})
    assert verify.first_unsent(forged.attributed("site1"), sent) == 2
    line = verify.mismatch(forged, "site1", 2, forged.attributed("site1"), sent)
    assert "MISMATCH: round 2:" in line and "never sent in round 2 (it sent that update in round 1)" in line


def test_verify_refuses_bad_input_in_one_line_with_exit_2(tmp_path, capsys):
    state = tmp_path / "state"
    assert verify.main(["--state-dir", str(state), "--model-version", "1", "--mlflow-uri", "sqlite:///x.db"]) == 2
    assert "no audit trail at" in capsys.readouterr().err
    state.mkdir()
    (state / "audit.jsonl").write_text(json.dumps(LINES[0]) + "\n")
    assert verify.main(["--state-dir", str(state), "--model-version", "1",
                        "--mlflow-uri", f"sqlite:///{tmp_path / 'none.db'}"]) == 2
    assert "no such MLflow database" in capsys.readouterr().err and not (tmp_path / "none.db").exists()
    folder = tmp_path / "adapters"
    folder.mkdir()
    (folder / "adapters.json").write_text(json.dumps({"method": "nearl"}))
    assert verify.main(["--state-dir", str(state), "--adapters", str(folder / "adapters.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "records no federation run (mlflow_run_id)" in err


def test_epsilon_spent_is_the_sites_verdict_value_else_its_audit_trails_largest(tmp_path):
    lines = [{"run_id": 9, "epsilon_after": 0.8}, {"run_id": 9, "epsilon_after": 1.1}, {"run_id": 10, "epsilon_after": 5.0}]
    assert verify.site_epsilon(tmp_path, lines, {9}) == 1.1  # no verdict: the training rounds' ledger values
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "9.json").write_text(json.dumps({"epsilon_spent": 1.4}))  # after the fine-tuning too
    assert verify.site_epsilon(tmp_path, lines, {9}) == 1.4
    assert verify.site_epsilon(tmp_path, [{"run_id": 9, "epsilon_after": None}], {8}) is None
