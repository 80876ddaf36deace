"""``nearl-client verify``: is every update the coordinator says came from this site one the site really sent?

    nearl-client verify --state-dir DIR (--model-version N | --adapters PATH) [--mlflow-uri URI] [--site NAME]

A privacy officer's check, run at the site against the coordinator's record of a model.
The coordinator records, for every round of a federation, the sha256 of each update it
aggregated, by site: the tags ``payload_sha256/round_NNNN/<site>`` of the federation's
MLflow run (:func:`nearl_protocol.keys.payload_tag`).  A registered version of
``nearl-adapters`` names that run, and so does the adapters folder's ``adapters.json``
(``mlflow_run_id``).  The site's audit trail (``<state-dir>/audit.jsonl``) holds the sha256
of every payload the site sent, written before it left.

Exit 0 with a one-screen summary (rounds contributed, epsilon spent) when each hash the
coordinator attributes to the site is one the site sent in that round; exit 1 naming the
first round whose hash the site never sent; exit 2 with one line for bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from nearl_protocol import keys

PROG = "nearl-client verify"


class VerifyError(Exception):
    """Bad input: no such version, no audit trail, a model without run provenance (exit 2)."""


@dataclass
class Record:
    """What the coordinator recorded about one model: its MLflow run's tags and the version's."""

    source: str  # how the model was named, for the summary
    run_id: str
    tags: dict[str, str]
    version_tags: dict[str, str] = field(default_factory=dict)

    def attributed(self, site: str) -> dict[int, str]:
        """round -> the sha256 of the update the coordinator aggregated from ``site``."""
        out = {}
        for tag, digest in self.tags.items():
            parsed = keys.read_payload_tag(tag)
            if parsed is not None and parsed[1] == site:
                out[parsed[0]] = digest
        return dict(sorted(out.items()))

    def not_applied(self, rounds: Iterable[int]) -> list[int]:
        """Rounds whose aggregate the coordinator did not apply (the update reached it, the model never had it)."""
        return [r for r in rounds if keys.round_tag(r, "not_applied") in self.tags]


def _client(uri: str | None):
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise VerifyError("give --mlflow-uri: the coordinator's MLflow (e.g. http://coordinator:5000 or "
                          "sqlite:///path/to/mlflow.db)")
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise VerifyError(f"--mlflow-uri {uri}: no such MLflow database; give the coordinator's store")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri), uri


def _run_tags(client, run_id: str, uri: str) -> dict[str, str]:
    from mlflow.exceptions import MlflowException

    try:
        return dict(client.get_run(run_id).data.tags)
    except MlflowException:
        raise VerifyError(f"MLflow run {run_id} is not in {uri}; give the coordinator's --mlflow-uri") from None


def record_of_version(version: str, uri: str | None) -> Record:
    """The record of registered model version ``nearl-adapters`` ``version``."""
    from mlflow.exceptions import MlflowException

    client, uri = _client(uri)
    try:
        mv = client.get_model_version(keys.MLFLOW_REGISTERED_MODEL, str(version))
    except MlflowException:
        raise VerifyError(f"{keys.MLFLOW_REGISTERED_MODEL} has no version {version} at {uri}; list the versions "
                          "in the MLflow UI (Models) or give the adapters with --adapters PATH") from None
    if not mv.run_id:
        raise VerifyError(f"{keys.MLFLOW_REGISTERED_MODEL} version {version} names no MLflow run: no record to check")
    return Record(f"{keys.MLFLOW_REGISTERED_MODEL} version {version}", mv.run_id, _run_tags(client, mv.run_id, uri),
                  dict(mv.tags or {}))


def record_of_adapters(path: Path, uri: str | None) -> Record:
    """The record of the federation that wrote an adapters folder (or its adapters.safetensors)."""
    folder = path.parent if path.suffix == ".safetensors" else path
    meta_file = folder / "adapters.json"
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as err:
        raise VerifyError(f"--adapters {path}: no readable {meta_file} ({type(err).__name__}); give the folder a "
                          "federation wrote (its final adapters)") from None
    run_id = meta.get("mlflow_run_id") if isinstance(meta, dict) else None
    if not run_id:
        raise VerifyError(f"--adapters {path}: {meta_file} records no federation run (mlflow_run_id); only a "
                          "tracked federation's adapters can be verified, e.g. --model-version N")
    client, uri = _client(uri)
    tags = _run_tags(client, run_id, uri)
    version_tags: dict[str, str] = {}
    try:  # the registered version of this run, when there is one, adds its provenance
        found = client.search_model_versions(f"run_id='{run_id}'")
        version_tags = dict(found[0].tags or {}) if found else {}
    except Exception:  # noqa: BLE001 - a store without a registry
        pass
    return Record(f"adapters {folder}", run_id, tags, version_tags)


Sent = dict[int, dict[str, set[int]]]  # round -> {sha256 of a payload sent in it: the Flower runs that sent it}


def sent_updates(lines: Iterable[Mapping[str, Any]]) -> Sent:
    """What the site's audit trail says it sent, by round.  A rerun with the same config and seeds sends
    bit-identical updates, so one hash may belong to several runs."""
    out: Sent = {}
    for line in lines:
        digest, r = line.get("payload_sha256"), line.get("round")
        if digest and isinstance(r, int) and not line.get("refused"):
            out.setdefault(r, {}).setdefault(digest, set()).add(line.get("run_id"))
    return out


def matching_runs(attributed: Mapping[int, str], sent: Sent) -> set[int]:
    """The site's Flower runs that sent every attributed update (else any that sent one of them)."""
    sets = [sent[r][d] for r, d in attributed.items() if d in sent.get(r, {})]
    return set.intersection(*sets) if sets and set.intersection(*sets) else set().union(*sets)


def first_unsent(attributed: Mapping[int, str], sent: Sent) -> int | None:
    """The first round whose attributed hash the site never sent in that round; None when every one matches."""
    return next((r for r, digest in attributed.items() if digest not in sent.get(r, {})), None)


def site_of(lines: list[Mapping[str, Any]], given: str | None, path: Path) -> str:
    if given:
        return given
    names = sorted({str(line["site"]) for line in lines if line.get("site")})
    if len(names) != 1:
        raise VerifyError(f"{path} holds {'no site name' if not names else 'sites ' + ', '.join(names)}; "
                          "name the site with --site NAME")
    return names[0]


def _ranges(rounds: list[int]) -> str:
    """[1, 2, 3, 5] -> '1-3, 5'."""
    if not rounds:
        return "none"
    parts, start = [], rounds[0]
    for a, b in zip(rounds, rounds[1:] + [None]):
        if b != a + 1:
            parts.append(str(start) if start == a else f"{start}-{a}")
            start = b
    return ", ".join(parts)


def site_epsilon(state_dir: Path, lines: list[Mapping[str, Any]], runs: set[int]) -> float | None:
    """Epsilon the site spent by the end of those runs: its verdict's ledger value, else its audit trail's."""
    for run in sorted(runs):
        report = state_dir / "reports" / f"{run}.json"
        if report.is_file():
            value = json.loads(report.read_text()).get("epsilon_spent")
            if value is not None:
                return float(value)
    values = [float(x["epsilon_after"]) for x in lines
              if x.get("run_id") in runs and x.get("epsilon_after") is not None]
    return max(values) if values else None


def summary(record: Record, site: str, audit_path: Path, attributed: dict[int, str], sent: Sent,
            epsilon: float | None) -> str:
    """The one-screen report of a verified model."""
    runs = matching_runs(attributed, sent)
    skipped = record.not_applied(attributed)
    contributed = [r for r in attributed if r not in skipped]
    unused = sorted(r for r, hashes in sent.items() if r not in attributed and set().union(*hashes.values()) & runs)
    rounds = record.version_tags.get("rounds") or str(max(attributed, default=0))
    strategy = record.version_tags.get("strategy")
    theirs = record.version_tags.get(f"epsilon/{site}")
    eps = ("none: the run was not differentially private at this site" if epsilon is None
           else f"{epsilon:.4g} (this site's DP ledger)")
    if theirs:
        eps += f"; the coordinator records {float(theirs):.4g}"
    return "\n".join([
        f"{PROG}: OK: every update the coordinator attributes to {site} is one this site sent",
        f"  model          {record.source} (MLflow run {record.run_id}"
        + (f", strategy {strategy}" if strategy else "") + ")",
        f"  audit trail    {audit_path} (Flower run {', '.join(map(str, sorted(runs))) or '-'})",
        f"  contributed    {len(contributed)} of {rounds} rounds: {_ranges(contributed)}",
        f"  not applied    {_ranges(skipped)} (the coordinator received the update but kept the model unchanged)",
        f"  sent, unused   {_ranges(unused)} (the site sent an update the coordinator did not aggregate)",
        f"  epsilon spent  {eps}",
    ])


def mismatch(record: Record, site: str, r: int, attributed: dict[int, str], sent: Sent) -> str:
    digest = attributed[r]
    elsewhere = sorted(x for x, hashes in sent.items() if digest in hashes)
    where = f" (it sent that update in round {_ranges(elsewhere)})" if elsewhere else ""
    return (f"{PROG}: MISMATCH: round {r}: {record.source} records update sha256 {digest} from {site}, which "
            f"this site's audit trail never sent in round {r}{where}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Check the coordinator's record of a model against this "
                                "site's audit trail (docs/site-verdict.md).")
    p.add_argument("--state-dir", type=Path, required=True, help="the site's state dir (holds audit.jsonl)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model-version", metavar="N", help=f"a registered version of {keys.MLFLOW_REGISTERED_MODEL}")
    which.add_argument("--adapters", type=Path, metavar="PATH", help="an adapters folder or its adapters.safetensors")
    p.add_argument("--mlflow-uri", default=None, help="the coordinator's MLflow (default: $MLFLOW_TRACKING_URI)")
    p.add_argument("--site", default=None, help="this site's name (default: the one in the audit trail)")
    return p


def main(argv: list[str] | None = None) -> int:
    from client.audit import read_lines

    args = build_parser().parse_args(argv)
    audit_path = args.state_dir.expanduser() / "audit.jsonl"
    try:
        lines = read_lines(audit_path)
        site = site_of(lines, args.site, audit_path)
        record = (record_of_version(args.model_version, args.mlflow_uri) if args.model_version
                  else record_of_adapters(args.adapters.expanduser(), args.mlflow_uri))
        if not any(keys.read_payload_tag(t) for t in record.tags):
            raise VerifyError(f"MLflow run {record.run_id} records no update hashes (payload_sha256/round_NNNN/SITE "
                              "tags); its coordinator predates this record, so nothing can be checked")
    except (VerifyError, OSError, ValueError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    attributed, sent = record.attributed(site), sent_updates(lines)
    bad = first_unsent(attributed, sent)
    if bad is not None:
        print(mismatch(record, site, bad, attributed, sent))
        return 1
    runs = matching_runs(attributed, sent)
    print(summary(record, site, audit_path, attributed, sent, site_epsilon(args.state_dir.expanduser(), lines, runs)))
    return 0
