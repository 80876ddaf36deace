"""The site worker's policy gate: every message of every run, before any data is read.

:class:`PolicyGate` answers one question per message: why must this site refuse it, or
None.  It reads only the message (the instruction's config record, a secure-aggregation
stage record, the size of the adapters it carries), the site's policy
(:mod:`client.policy`) and the site's book of runs (:mod:`client.approvals`), and writes
what it decided into that book.  The worker turns a reason into an error reply and an
audit line, so the round goes on without this site and the coordinator shows the reason.

Secure aggregation: key setup and key sharing carry no config.  Those of a run the site has
not seen yet pass (they read no data and send only fresh public keys and encrypted shares),
so that the run's first train instruction (the collect stage, which carries the config)
can be judged; those of a run that waits for approval or was refused are refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from client.approvals import ACCEPTED, APPROVED, PENDING, REFUSED, RunBook, asked_config, asked_sha256
from client.policy import SitePolicy, config_problem, stage_problem, train_problem
from nearl_protocol import keys
from nearl_protocol.messages import ProtocolError, read_instruction
from nearl_protocol import secagg as sa


def reply_bytes_of(msg: Any) -> int:
    """What a train reply to ``msg`` would carry: the same adapters in the same dtype as the instruction
    (a masked reply: the same count of uint32 values plus its two extra slots)."""
    arrays = msg.content.array_records.get(keys.ARRAYS) if msg.has_content() else None
    size = int(arrays.count_bytes()) if arrays is not None else 0
    return size + 4 * sa.EXTRA_SLOTS if size and keys.SECAGG in msg.content.config_records else size


def waiting_reason(run_id: int, sha: str) -> str:
    """The refusal of an unapproved run: recognisable by its first words on the coordinator's round line."""
    return f"{keys.WAITING_FOR_APPROVAL} (config sha256 {sha[:12]}; the site runs nearl-client approve {run_id})"


class PolicyGate:
    """The policy of one site, its state dir and who it is (for the book and the audit trail)."""

    def __init__(self, policy: SitePolicy, state_dir: Path, site: str, coordinator: str = ""):
        self.policy = policy
        self.book = RunBook(state_dir)
        self.site = site
        self.coordinator = coordinator

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> "PolicyGate | None":
        """The gate of a warm site's spec (written by nearl-client), None when it runs without --policy."""
        if not spec.get("policy"):
            return None
        return cls(SitePolicy.from_dict(spec["policy"], "the worker's site policy"), Path(spec["state_dir"]),
                   spec["site"], spec.get("coordinator") or "")

    def problem(self, msg: Any) -> str | None:
        """Why this site refuses ``msg`` (one line the coordinator sees), or None to let it run."""
        run_id, kind = int(msg.metadata.run_id), msg.metadata.message_type
        known = self.book.get(run_id)
        if known is not None and known.get("status") == REFUSED and known.get("by") == "operator":
            return self._note(run_id, kind, None, None, None, known["reason"])
        if kind == keys.SECAGG_MESSAGE_TYPE:
            return self._stage(msg, run_id, known)
        try:
            instruction = read_instruction(msg)
        except ProtocolError as err:
            return self._note(run_id, kind, None, None, None, str(err))
        asked, server_round = asked_config(instruction), instruction.server_round
        problem = config_problem(self.policy, asked)
        if problem is None and kind == "train":
            record = msg.content.config_records.get(keys.SECAGG)
            problem = train_problem(self.policy, record, reply_bytes_of(msg))
        if problem is not None:
            return self._note(run_id, kind, server_round, asked, REFUSED, f"{keys.SITE_POLICY}: {problem}", "policy")
        if self.policy.approval == "manual":
            sha = asked_sha256(asked)
            if sha not in (known or {}).get("approved", []):
                return self._note(run_id, kind, server_round, asked, PENDING, waiting_reason(run_id, sha))
            return self._note(run_id, kind, server_round, asked, APPROVED, None, "operator")
        return self._note(run_id, kind, server_round, asked, ACCEPTED, None, "auto")

    def _stage(self, msg: Any, run_id: int, known: Mapping[str, Any] | None) -> str | None:
        """A key setup, key sharing or unmask message: the secure sum's size, and a run's standing."""
        record = msg.content.config_records.get(keys.SECAGG) if msg.has_content() else None
        server_round = record.get(keys.SERVER_ROUND) if record is not None else None
        problem = stage_problem(self.policy, record)
        if problem is not None:
            return self._note(run_id, msg.metadata.message_type, server_round, None, None,
                              f"{keys.SITE_POLICY}: {problem}")
        if known is not None and known.get("status") == PENDING:
            return self._note(run_id, msg.metadata.message_type, server_round, None, None,
                              waiting_reason(run_id, known.get("config_sha256") or ""))
        if known is not None and known.get("status") == REFUSED:
            return self._note(run_id, msg.metadata.message_type, server_round, None, None, known["reason"])
        return self._note(run_id, msg.metadata.message_type, server_round, None, None, None)

    def _note(self, run_id: int, kind: str, server_round: Any, asked: Mapping[str, Any] | None,
              status: str | None, reason: str | None, by: str | None = None) -> str | None:
        """Record the message and the answer in the book; return the refusal reason (None: it runs)."""
        self.book.note(run_id, site=self.site, coordinator=self.coordinator,
                       server_round=int(server_round) if isinstance(server_round, int) else None, kind=kind,
                       asked=asked, status=status, reason=reason, by=by)
        return reason

