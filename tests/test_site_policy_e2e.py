"""A site under manual approval in a real federation, decided from its console in a real browser.

nearl-server and two warm nearl-client sites on loopback (tiny demo data, 24 training images
per site, 3 rounds); site2 runs ``--policy`` with ``approval: manual`` and its console
(``nearl-client console``) serves its state dir.  Round 1 goes on without site2, which
answers "waiting for approval" and records the run as pending; headless chromium shows the
waiting run and its approve button; the button's form is posted as the browser posts it;
a later round trains with site2.  The coordinator's terminal, MLflow and site2's audit trail
say so.  With ``NEARL_DOCS_SCREENSHOTS=1`` the browser's screenshots replace docs/images/.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import httpx
import pytest
import yaml

from client.approvals import RunBook
from client.audit import read_lines
from nearl_core.demo_data import generate_demo_data
from nearl_protocol import processes as flower
from tests.console_helpers import NO_BROWSER, browse, chromium
from tests.fed_helpers import BIN, ROOT, Procs, dump, history, mlflow_run, nearl_client, nearl_server, wait_for

pytestmark = [pytest.mark.slow]
DOCS_IMAGES = ROOT / "docs" / "images"


def poll(what: str, probe, procs: Procs, timeout: float, every: float):
    """The first truthy value of ``probe()`` while the coordinator runs; fails after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := probe():
            return found
        assert procs.procs["server"].poll() is None, dump(procs)
        time.sleep(every)
    raise AssertionError(f"site2 {what} within {timeout:.0f}s\n{dump(procs)}")


def wait_for_pending(state: Path, procs: Procs, timeout: float) -> dict:
    def pending():
        return (RunBook(state).pending() if (state / "runs.json").exists() else [])[:1]

    return poll("recorded no pending run", pending, procs, timeout, 0.2)[0]


def wait_for_update(state: Path, procs: Procs, timeout: float) -> dict:
    """site2's first audited train reply that carried adapters."""
    def sent():
        return [x for x in read_lines(state / "audit.jsonl") if x.get("arrays")][:1]

    return poll("sent no update", sent, procs, timeout, 0.5)[0]


def screenshot(url: str, tmp: Path, name: str) -> Path:
    """The console as the operator sees it; small (256 colours), into docs/images/ when asked."""
    from PIL import Image

    raw = tmp / f"raw-{name}"
    browse(url, tmp / f"profile-{name}", screenshot=raw, size="1200,1700")
    out = (DOCS_IMAGES if os.environ.get("NEARL_DOCS_SCREENSHOTS") == "1" else tmp) / name
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.open(raw).convert("RGB").quantize(colors=256).save(out, optimize=True)
    return out


@pytest.mark.timeout(1800)
def test_a_run_waits_for_the_sites_approval_then_trains_after_the_console_approves_it(tmp_path):
    sites = generate_demo_data(tmp_path / "data", 2, train_per_site=24, val_per_site=8, test_per_site=8)
    policy = tmp_path / "site2-policy.yaml"
    policy.write_text(yaml.safe_dump({"approval": "manual", "methods": ["nearl"], "max-rounds": 5, "require-dp": True}))
    state = tmp_path / "state-site2"
    procs = Procs(tmp_path / "logs")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    port, console_port = flower.free_port(), flower.free_port()
    console = f"http://127.0.0.1:{console_port}"
    browser = chromium() is not None
    doms = {}
    try:
        nearl_server(procs, port, tmp_path, "--insecure", "--rounds", "3", "--min-sites", "2", "--round-timeout",
                     "600", "--wait-timeout", "300", "--checkpoint-dir", str(tmp_path / "ck"), "--mlflow-uri", uri,
                     "--dp-epsilon", "8")
        wait_for(procs, "server", "submitted", 300)
        nearl_client(procs, "site1", sites[0], port, tmp_path, "--insecure", "--state-dir", str(tmp_path / "state-site1"))
        nearl_client(procs, "site2", sites[1], port, tmp_path, "--insecure", "--state-dir", str(state),
                     "--policy", str(policy), "--max-epsilon", "10")
        wait_for(procs, "site2", "site policy", 120)
        procs.start("console", [str(BIN / "nearl-client"), "console", "--state-dir", str(state), "--port",
                                str(console_port)], env={**os.environ}, cwd=tmp_path)
        run = wait_for_pending(state, procs, 900)
        rid = run["run_id"]
        if browser:
            doms["waiting"] = browse(console + "/", tmp_path / "profile-waiting")
            action = re.search(r'action="(/runs/[^"]+/approve)"', doms["waiting"]).group(1)
            screenshot(console + "/", tmp_path, "console-waiting.png")
        else:
            action = f"/runs/{rid}/approve"
        approved = httpx.post(console + action, headers={"Origin": console}, follow_redirects=False, timeout=30)
        assert approved.status_code == 303, approved.text  # the button's form, posted as a browser posts it
        first = wait_for_update(state, procs, 900)
        if browser:  # while the federation still runs
            doms["after"] = browse(console + "/", tmp_path / "profile-after")
            screenshot(console + "/", tmp_path, "console-approved.png")
        assert procs.wait("server", 1200) == 0, dump(procs)
    finally:
        procs.stop_all()

    out = procs.text("server")
    rounds = [line for line in out.splitlines() if line.startswith("round ")]
    assert rounds[0].startswith("round 1/3  sites 1/2"), out
    assert "\n    site2: waiting for approval (config sha256 " in out, out
    trained = [r for r in (2, 3) if any(x.startswith(f"round {r}/3  sites 2/2") for x in rounds)]
    assert trained, f"site2 never trained after its approval\n{out}"
    client, mlrun = mlflow_run(uri)
    answered = history(client, mlrun.info.run_id, "site2/answered")
    assert answered[1] == 0.0 and all(answered[r] == 1.0 for r in range(trained[0], 4)), answered
    assert "site2: waiting for approval" in mlrun.data.tags["round_0001_rejected"]

    lines = read_lines(state / "audit.jsonl")
    waits = [x for x in lines if (x.get("refused") or "").startswith("waiting for approval")]
    (decision,) = [x for x in lines if x.get("decision")]
    sent = [x for x in lines if x.get("message_type") == "train" and x.get("arrays")]
    assert waits and waits[0]["round"] == 1 and waits[0]["bytes_sent"] == 0
    assert decision["decision"] == "approved" and decision["by"] == "console"
    assert decision["config_sha256"] == RunBook(state).get(rid)["approved"][0] == run["config_sha256"]
    assert [x["round"] for x in sent] == list(range(trained[0], 4)) and all(x["payload_sha256"] for x in sent)
    assert RunBook(state).get(rid)["status"] == "approved"
    assert all(x["epsilon_after"] > 0 for x in sent) and (state / "privacy.json").is_file()  # DP-SGD, as required
    print("coordinator:", *[x for x in out.splitlines() if x.startswith(("round ", "    site2"))], sep="\n  ")
    print("site2:", *[x for x in procs.text("site2").splitlines() if "refused" in x or "sent " in x], sep="\n  ")
    if not browser:
        pytest.skip(f"{NO_BROWSER}: the federation and the approval passed; the page in a browser was not checked")
    assert f"Approve run {rid}" in doms["waiting"] and "waiting for approval" in doms["waiting"]
    assert "No config was approved before at this site" in doms["waiting"]
    after = doms["after"]
    assert f"Approve run {rid}" not in after and "No run is waiting for this site's approval" in after
    assert "approved" in after and "console" in after and first["payload_sha256"][:16] in after
    assert '<svg class="ledger"' in after and "ceiling 10" in after  # epsilon of this run against --max-epsilon
