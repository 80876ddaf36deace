"""When a run ends at a site: the verdict job its last evaluate message leaves, run after the reply has gone.

The site knows a run is over when it answers the coordinator's last evaluate message
(``server-round`` = ``total-rounds``, the message that also personalizes).  That handler
already measures the federation's final adapters (and the personalized ones) on the site's
test split; :func:`note_final_evaluate` takes those rows from its reply and hands a
:class:`ReportJob` to this process's runner.  The rest (the zero-shot row, the local-only
model, the totals, the files: :func:`run_job`) happens after the reply has left, so the
local-only training never holds the coordinator's round past its timeout:

* a warm site (the default): the site worker runs the job right after it has pushed the
  reply and closed the task (:mod:`client.worker`), with the backbone still built.  A next
  message (a new run) waits until the job is done;
* a cold site (``nearl-client --cold``): Flower's process per message would end with the
  reply, so :mod:`client.app` starts ``python -m client.site_report JOB`` detached;
* without a runner (the simulation's virtual sites, tests calling the handlers) no report
  is written; the simulation compares the same models itself (``simulation/compare.py``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from client.binding import SiteBinding
from client.verdict import REPORTS_DIR, Row, measured_rows, reply_split

Log = Callable[[str], None]
Runner = Callable[["ReportJob"], None]
_runner: Runner | None = None


@dataclass
class ReportJob:
    """Everything :func:`run_job` needs, plain enough to be written to a file for a detached process."""

    run_id: int
    ended: float
    split: str
    rows: list[dict[str, Any]]  # the rows the final evaluate measured (federated, personalized)
    instruction: dict[str, Any]  # nearl_protocol.messages.Instruction's fields
    binding: dict[str, Any]  # client.binding.SiteBinding's fields (paths as text)

    def site_binding(self) -> SiteBinding:
        raw = dict(self.binding)
        for name in ("data", "state_dir"):
            raw[name] = Path(raw[name]) if raw.get(name) else None
        return SiteBinding(**raw)

    def read_instruction(self):
        from nearl_protocol.messages import Instruction

        return Instruction(**self.instruction)


def use_runner(runner: Runner | None) -> None:
    """Who runs this process's report jobs (the warm worker, the cold app); None: nobody, no report."""
    global _runner
    _runner = runner


def note_final_evaluate(msg, binding: SiteBinding, reply) -> ReportJob | None:
    """Called by the evaluate handler once its reply is built and audited; the job when the run just ended."""
    from nearl_protocol.messages import metrics_of, read_instruction

    if _runner is None or reply.has_error():
        return None
    instruction = read_instruction(msg)
    if not instruction.final_evaluation:  # the run's end: the kept adapters on the test split (early stop too)
        return None
    metrics = metrics_of(reply.content)
    job = ReportJob(run_id=int(msg.metadata.run_id), ended=time.time(), split=reply_split(metrics),
                    rows=[r.to_dict() for r in measured_rows(metrics)],
                    instruction=dataclasses.asdict(instruction),
                    binding={k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(binding).items()})
    _runner(job)
    return job


def run_job(job: ReportJob, log: Log) -> Path:
    """Measure the zero-shot and local-only rows, total the run's costs, write the verdict; its JSON's path."""
    from client import audit
    from client.local_baseline import cache_key, data_digest, local_only, skipped
    from client.task import cached_site, site_config
    from client.verdict import Verdict, row_from_metrics, run_totals, write_verdict
    from nearl_core.train import select_device

    binding, instruction = job.site_binding(), job.read_instruction()
    cfg = site_config(instruction, binding)
    device = select_device(cfg.train.device)
    site = cached_site(binding.data, cfg.task.classes)
    epochs = instruction.total_rounds * instruction.local_epochs
    ceiling = binding.max_epsilon if cfg.privacy.enabled else None
    key = cache_key(data_digest(site), instruction.nearl_config, epochs=epochs, backbone=instruction.backbone,
                    dp_ceiling=ceiling)
    rows = [Row.from_dict(r) for r in job.rows]
    rows.append(row_from_metrics("zero-shot", _measure(_zero_shot(cfg, device), site, job.split, cfg, device)))
    baseline = (local_only(cfg, site, device, state_dir=binding.privacy_dir(), key=key, epochs=epochs,
                           max_epsilon=ceiling, log=log) if binding.local_baseline
                else skipped(key, epochs, "nearl-client --no-local-baseline"))
    if baseline.model is not None:
        rows.append(row_from_metrics("local-only", _measure(baseline.model, site, job.split, cfg, device)))
    sent, received, seconds = run_totals(audit.read_lines(binding.audit_file()), job.run_id)
    verdict = Verdict(run_id=str(job.run_id), site=binding.site, time=job.ended, split=job.split, rows=rows,
                      epsilon_spent=_epsilon(cfg, binding), bytes_sent=sent, bytes_received=received,
                      compute_seconds=seconds,
                      extra={"rounds": instruction.total_rounds, "local_epochs": instruction.local_epochs,
                             "coordinator": binding.coordinator, "local_baseline": baseline.facts(),
                             "sent_to_coordinator": False})
    path = write_verdict(binding.privacy_dir(), verdict)
    log(f"site verdict of run {job.run_id} in {path} (and {path.with_suffix('.md').name})")
    return path


def _zero_shot(cfg, device):
    from client.local_baseline import fresh_model

    return fresh_model(cfg, device).eval()


def _measure(model, site, split: str, cfg, device) -> dict[str, float]:
    from nearl_core.train import evaluate, make_loader

    loader = make_loader(site.samples(split), model.preprocess, cfg.train, device, shuffle=False)
    return evaluate(model, loader, device, amp=cfg.train.amp)


def _epsilon(cfg, binding: SiteBinding) -> float | None:
    """The site's DP ledger after the run (every DP step on this data); None when the run was not DP."""
    from nearl_core.privacy import PrivacyState

    if not cfg.privacy.enabled:
        return None
    state = PrivacyState.load(binding.privacy_dir())
    return float(state.epsilon) if state is not None else None


def run_deferred(jobs: list[ReportJob], log: Log) -> None:
    """Run and drop every queued job; a failing one is logged in one line and never stops the worker."""
    while jobs:
        job = jobs.pop(0)
        try:
            run_job(job, log)
        except Exception as err:  # noqa: BLE001 - a report must not take the site down
            log(f"site verdict of run {job.run_id} not written: {type(err).__name__}: {str(err).splitlines()[0]}")


# -- a cold site: a detached process -----------------------------------------------------------------------
def write_job(job: ReportJob) -> Path:
    """``<state-dir>/reports/.<run>.job.json``: the job for a process of its own."""
    folder = job.site_binding().privacy_dir() / REPORTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f".{job.run_id}.job.json"
    path.write_text(json.dumps(dataclasses.asdict(job)))
    return path


def spawn(job: ReportJob) -> None:
    """Write the job next to the reports and start ``python -m client.site_report`` on it, detached."""
    path = write_job(job)
    root = str(Path(__file__).resolve().parents[1])  # the code that answered (a cold site: the app bundle's)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    with open(path.with_name(f".{job.run_id}.job.log"), "ab") as out:
        subprocess.Popen([sys.executable, "-m", "client.site_report", str(path)], stdin=subprocess.DEVNULL,
                         stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def main(argv: list[str] | None = None) -> int:
    """``python -m client.site_report JOB``: run a job written by :func:`spawn`, then remove it."""
    path = Path((sys.argv[1:] if argv is None else argv)[0])
    job = ReportJob(**json.loads(path.read_text()))
    run_job(job, lambda line: print(f"[{job.binding['site']}] {line}", flush=True))
    path.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
