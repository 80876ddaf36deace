"""A site's state dir written by hand (as a running site leaves it) and a headless browser, for the console tests."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from client.approvals import RunBook

XSS = '<script>alert("xss")</script><img src=x onerror=alert(1)>'
VERDICT = {"run_id": "1234", "site": "siteA", "time": 1_700_000_000.0, "split": "test",
           "rows": [{"model": "zero-shot", "accuracy": 0.41, "balanced_accuracy": 0.40, "macro_f1": 0.38,
                     "auroc": 0.61, "examples": 24},
                    {"model": "federated", "accuracy": 0.72, "balanced_accuracy": 0.70, "macro_f1": 0.69,
                     "auroc": 0.83, "examples": 24}],
           "epsilon_spent": 2.5, "bytes_sent": 123456, "bytes_received": 654321, "compute_seconds": 42.0}


def write_state(state: Path, *, run_id: int = 77) -> Path:
    """Status, worker, data facts, a pending run whose config holds markup, two audited messages, a decision,
    the privacy ledger and a verdict: every section of the page has something to show."""
    now = time.time()
    (state / "runtime").mkdir(parents=True, exist_ok=True)
    (state / "reports").mkdir(exist_ok=True)
    write(state / "runtime" / "status.json", {"time": now, "site": "siteA", "supervisor_pid": os.getpid(),
                                              "supernode_pid": os.getpid(), "worker_pid": os.getpid(),
                                              "worker_restarts": 0, "coordinator": "fl.example.org:9092",
                                              "connection": "connected"})
    write(state / "runtime" / "worker.json", {"pid": os.getpid(), "warm": True, "time": now, "site": "siteA",
                                              "last": {"time": now - 5, "run_id": 1234, "round": 3,
                                                       "message_type": "train", "answer": "replied"}})
    write(state / "site.json", {"site": "siteA", "data": "/data/siteA", "checked": now - 60,
                                "classes": ["normal", "nodule", "opacity"], "images": 72,
                                "counts": {"test": {"normal": 4, "nodule": 4, "opacity": 0},  # as site.json
                                           "train": {"normal": 16, "nodule": 16, "opacity": 16},  # sorts them
                                           "val": {"normal": 4, "nodule": 4, "opacity": 4}},
                                "check": "OK: every image decodes", "notes": ["no test images of opacity"],
                                "max_epsilon": 4.0, "policy": {"approval": "manual", "methods": ["nearl"]},
                                "coordinator": "fl.example.org:9092"})
    asked = {"nearl-config": {"adapter": {"method": "nearl", "rank": 24}, "task": {"classes": ["normal", XSS]},
                              "train": {"lr": 0.001}}, "local-epochs": 1, "total-rounds": 3,
             "transport-dtype": "float32"}
    book = RunBook(state)
    book.note(1234, site="siteA", coordinator="fl.example.org:9092", server_round=1, kind="train",
              asked={**asked, "total-rounds": 2}, status="accepted", reason=None, by="auto")
    book.note(run_id, site="siteA", coordinator="fl.example.org:9092", server_round=1, kind="train", asked=asked,
              status="pending", reason="waiting for approval (config sha256 0123)", by=None)
    lines = [message_line(1234, 1, now - 300, 1.2), message_line(1234, 2, now - 200, 2.5),
             {"time": now - 100, "run_id": 1234, "site": "siteA", "decision": "approved", "config_sha256": "ab" * 32,
              "reason": None, "by": "console", "coordinator": "fl.example.org:9092"}]
    (state / "audit.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    write(state / "privacy.json", {"epsilon": 2.5, "delta": 1e-5, "steps": 40, "rounds": 2,
                                   "updated": "2026-01-01T10:00:00+0000"})
    write(state / "reports" / "1234.json", {**VERDICT, "time": now - 50})
    return state


def message_line(run_id: int, server_round: int, t: float, eps: float) -> dict:
    return {"time": t, "run_id": run_id, "round": server_round, "site": "siteA", "coordinator": "fl.example.org:9092",
            "message_type": "train", "arrays": [["adapters.oca.0.weight", [24, 32], "float32"],
                                                [f"adapters.{XSS}", [4], "float32"]],
            "payload_sha256": "f" * 64, "bytes_sent": 4_321, "metrics": {"num-examples": 48},
            "epsilon_before": eps - 1, "epsilon_after": eps, "declined": None, "refused": None}


def write(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


# -- a headless browser --------------------------------------------------------------------------------------
def chromium() -> str | None:
    """Debian's chromium (``apt-get install -y chromium``; .ci/run installs it), or None."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


NO_BROWSER = "no headless chromium on this machine (apt-get install -y chromium)"


def browse(url: str, profile: Path, *, screenshot: Path | None = None, size: str = "1200,1500") -> str:
    """The DOM of ``url`` after load (``--dump-dom``), or write a screenshot; a fresh profile each time."""
    what = [f"--screenshot={screenshot}", f"--window-size={size}"] if screenshot else ["--dump-dom"]
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
           "--hide-scrollbars", f"--user-data-dir={profile}", *what, url]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"chromium failed ({done.returncode}): {done.stderr[-2000:]}"
    return done.stdout
