"""A warm site's fast checks: the Flower internals it relies on, the app bundles it accepts, and what
its worker answers to a bundle it refuses (without a SuperNode: the task input is built here)."""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from client import flower_internals as fi
from client.fab_check import COMPONENTS, FabPolicy, fab_identity, own_fab_hash
from client.worker import Worker
from nearl_protocol import keys
from nearl_protocol.messages import REFUSAL_CODE, instruction_config, read_reply
from nearl_protocol.bundle import bundle_files, stage
from nearl_protocol.processes import APP_DIR
from tests.fed_helpers import instruction


def test_the_installed_flower_offers_every_internal_the_site_worker_uses():
    missing = fi.check()
    assert not missing, (
        f"flwr {fi.flower_version()} lacks what client/flower_internals.py uses (written for flwr=={fi.PINNED}.*): "
        f"{', '.join(missing)}. Pin flwr back to {fi.PINNED}.* or port client/flower_internals.py; until then run "
        "sites with nearl-client --cold.")
    assert fi.flower_version().startswith(fi.PINNED + "."), \
        f"flwr {fi.flower_version()} installed; client/flower_internals.py is checked against {fi.PINNED}.*"


def test_flower_supernode_still_takes_the_flags_a_warm_site_starts_it_with():
    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

    parser = _parse_args_run_supernode()
    options = {o for action in parser._actions for o in action.option_strings}
    assert set(fi.SUPERNODE_FLAGS) <= options, f"flower-supernode lacks {set(fi.SUPERNODE_FLAGS) - options}"
    assert "process" in next(a for a in parser._actions if "--isolation" in a.option_strings).choices


def test_the_installed_flower_still_logs_what_the_supervisor_reads_of_a_supernodes_connection():
    missing = fi.missing_log_messages()
    assert not missing, (f"flwr {fi.flower_version()} no longer writes {', '.join(missing)}: the site's supervisor "
                         "cannot tell a connected SuperNode from one that retries; update SUPERNODE_LOG in "
                         "client/flower_internals.py")
    line = "\x1b[93mWARNING \x1b[0m:   Connection attempt failed, retrying in 0.13 seconds\n"
    assert fi.supernode_event(line) == "retrying"
    assert fi.supernode_event("INFO :      SuperNode ID: 123") == "connected"
    assert fi.supernode_event("WARNING :   Giving up reconnection after 6.01 seconds and 6 tries.") == "gave-up"
    assert fi.supernode_event("INFO :      Starting Flower SuperNode") is None


def fab(publisher: str = "nearl", name: str = "nearl-federated", components: dict | None = None) -> bytes:
    comps = components or COMPONENTS
    text = (f'[project]\nname = "{name}"\nversion = "1.0.0"\n\n[tool.flwr.app]\npublisher = "{publisher}"\n\n'
            "[tool.flwr.app.components]\n" + "".join(f'{k} = "{v}"\n' for k, v in comps.items()))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("pyproject.toml", text)
    return buf.getvalue()


def flower_build(app_dir: Path) -> bytes:
    """The bundle as ``flwr run`` builds it: Flower's own walk of every file under ``app_dir``."""
    from flwr.cli.build import build_fab_from_disk

    return build_fab_from_disk(app_dir)


def test_own_fab_hash_is_the_bundle_flwr_run_submits_and_is_deterministic(tmp_path):
    own = own_fab_hash(APP_DIR)
    theirs = flower_build(APP_DIR)
    assert own == fi.fab_sha256(theirs) == fi.fab_sha256(fi.build_fab(APP_DIR)) and len(own) == 64
    assert fab_identity(theirs) == ("nearl", "nearl-federated", COMPONENTS)
    staged = stage(APP_DIR, tmp_path / "staged")  # what nearl-server submits
    assert fi.fab_sha256(flower_build(staged)) == own
    assert not (staged / ".venv").exists() and len(list(staged.rglob("*"))) < 1000


def test_the_bundle_walk_skips_only_what_flower_always_excludes(tmp_path):
    """Byte for byte Flower's FAB for a tree with every case the shortcut walk treats specially."""
    app = tmp_path / "app"
    (app / "nearl_core" / "sub").mkdir(parents=True)
    text = (APP_DIR / "pyproject.toml").read_text()
    start = text.index("fab-include = [")
    text = text[:start] + 'fab-include = ["pyproject.toml", "nearl_core/**/*.py", "nearl_core/**/*.json"]' + \
        text[text.index("]", start) + 1:]
    (app / "pyproject.toml").write_text(text)
    (app / ".gitignore").write_text("ignored/\n")
    (app / "nearl_core" / "a.py").write_text("A = 1\n")
    (app / "nearl_core" / "sub" / "b.json").write_text("{}")
    for skipped in (".venv/nearl_core/x.py", ".flwr/nearl_core/x.py", "nearl_core/__pycache__/c.py",
                    "nearl_core/ignored/d.py"):
        (app / skipped).parent.mkdir(parents=True, exist_ok=True)
        (app / skipped).write_text("SKIPPED = 1\n")
    (app / "nearl_core" / ".venv").mkdir()  # not at the top: Flower keeps it, and so must the walk
    (app / "nearl_core" / ".venv" / "e.py").write_text("E = 1\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "f.py").write_text("F = 1\n")
    (app / "nearl_core" / "link.py").symlink_to(app / "nearl_core" / "a.py")
    (app / "nearl_core" / "linked").symlink_to(outside, target_is_directory=True)
    ours, theirs = fi.build_fab(app), flower_build(app)
    assert ours == theirs
    names = set(zipfile.ZipFile(io.BytesIO(ours)).namelist())
    assert {"nearl_core/a.py", "nearl_core/sub/b.json", "nearl_core/.venv/e.py"} <= names, names
    assert not any("x.py" in n or "c.py" in n or "d.py" in n or "link" in n for n in names), names
    assert bundle_files(app).keys() >= {"nearl_core/a.py", "nearl_core/ignored/d.py"}  # .gitignore: Flower's filter


def test_policy_accepts_only_listed_nearl_bundles():
    ours = fab()
    policy = FabPolicy(frozenset({fi.fab_sha256(ours)}))
    assert policy.problem(ours, fi.fab_sha256(ours)) is None
    other = fab(components={**COMPONENTS, "clientapp": "client.evil:app"})
    assert "not a NEARL app" in policy.problem(other, fi.fab_sha256(other))
    foreign = fab(publisher="flwrlabs", name="quickstart-pytorch",
                  components={"clientapp": "pytorchexample.client_app:app", "serverapp": "pytorchexample.server_app:app"})
    why = policy.problem(foreign, fi.fab_sha256(foreign))
    assert why.startswith("not a NEARL app: publisher=flwrlabs name=quickstart-pytorch"), why
    newer = fab(name="nearl-federated") + b"\0"  # a NEARL bundle with other bytes (another version)
    assert "is not one this site accepts" in policy.problem(newer, fi.fab_sha256(newer))
    assert "hash mismatch" in policy.problem(ours, "0" * 64)
    assert "unreadable app bundle" in policy.problem(b"not a zip", "")


@pytest.fixture
def worker(tmp_path, demo_root) -> Worker:
    spec = {"site": "siteA", "runtime_address": "127.0.0.1:1", "accepted_fabs": [fi.fab_sha256(fab())],
            "task_file": str(tmp_path / "task.json"), "config": "demo", "data": str(demo_root / "site1")}
    return Worker(spec)


def task_input(tmp_path, demo_root, content: bytes, message_type: str = "train") -> fi.TaskInput:
    from nearl_core.config import load_config

    cfg = instruction_config(nearl_config=load_config("demo").to_dict(), transport="float32", backbone="")
    msg = instruction(RecordDict({keys.CONFIG: cfg}), message_type)
    node_config = {"site": "siteA", "data-path": str(demo_root / "site1"), "state-dir": str(tmp_path / "state"),
                   "coordinator": "127.0.0.1:9"}
    context = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})
    return fi.TaskInput(msg, context, fi.fab_sha256(content), content, "flwrlabs/x", "1.0.0")


@pytest.mark.parametrize("case", ["foreign app", "other hash", "query message"])
def test_worker_refuses_with_a_reason_in_the_reply_log_and_audit_trail(tmp_path, demo_root, worker, capsys, case):
    content = {"foreign app": fab(publisher="flwrlabs"), "other hash": fab() + b"\0", "query message": fab()}[case]
    reply, ok, _ = worker.answer(task_input(tmp_path, demo_root, content, "query" if case == "query message" else "train"))
    assert ok and reply.has_error() and reply.error.code == REFUSAL_CODE
    why = read_reply(reply)
    expected = {"foreign app": "not a NEARL app", "other hash": "is not one this site accepts",
                "query message": "message type 'query' is not served"}[case]
    assert why.claimed_site == "siteA" and expected in why.error
    assert expected in capsys.readouterr().out
    (line,) = [json.loads(x) for x in (tmp_path / "state" / "audit.jsonl").read_text().splitlines()]
    assert expected in line["refused"] and line["bytes_sent"] == 0 and line["arrays"] == []


def test_a_dead_workers_message_header_round_trips(tmp_path, demo_root):
    msg = task_input(tmp_path, demo_root, fab()).message
    back = fi.message_from_header(fi.message_header(msg))
    assert back.metadata.message_id == msg.metadata.message_id and back.metadata.run_id == msg.metadata.run_id
    assert not back.content.config_records and not back.content.array_records


def test_train_replies_say_which_process_answered_and_whether_it_was_warm():
    from client.task import cached_backbone, worker_metrics

    before = cached_backbone.cache_info().misses
    out = worker_metrics(before)
    assert out == {keys.WORKER_PID: os.getpid(), keys.WORKER_BUILDS: before, keys.WORKER_WARM: 1}
    assert worker_metrics(before - 1)[keys.WORKER_WARM] == 0
    assert {keys.mlflow_name(k) for k in keys.WORKER} == {"worker_pid", "worker_builds", "worker_warm"}


def test_a_signalled_supervisor_tells_its_supernode_once_and_only_after_the_grace_period(tmp_path, monkeypatch):
    """A group signal already reached the SuperNode: a second SIGTERM at once would kill it mid-shutdown."""
    import signal

    from client import supervisor as sv

    class Proc:
        shutting_down = False

        def __init__(self):
            self.signals = []

        def poll(self):
            return None

        def signal(self, sig):
            self.signals.append(sig)

    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"task_file": str(tmp_path / "task.json"), "site": "siteA"}))
    sup = sv.Supervisor(spec)
    sup.supernode = Proc()
    now = [100.0]
    monkeypatch.setattr(sv.time, "monotonic", lambda: now[0])
    sup.on_signal(signal.SIGTERM, None)
    sup.on_signal(signal.SIGTERM, None)  # a second signal does not restart the grace period
    sup.forward_stop()
    assert sup.stopping and sup.supernode.signals == []
    now[0] += sv.FORWARD_GRACE
    sup.forward_stop()
    sup.forward_stop()
    assert sup.supernode.signals == [signal.SIGTERM]
    # one that logged its graceful exit got the group signal and is only slow to finish: left alone
    late = sv.Supervisor(spec)
    late.supernode = Proc()
    late.supernode.shutting_down = True
    late.on_signal(signal.SIGTERM, None)
    now[0] += sv.FORWARD_GRACE
    late.forward_stop()
    assert late.supernode.signals == []


def fake_installation(root: Path) -> Path:
    (root / "client").mkdir(parents=True)
    (root / "pyproject.toml").write_text('[project]\nname = "nearl-federated"\n')
    (root / "client" / "task.py").write_text("x = 1\n")
    return root


def test_an_idle_worker_exits_for_a_restart_when_the_installed_code_changes(tmp_path, worker, monkeypatch, capsys):
    from client import fab_check
    from client import worker as worker_module

    app = fake_installation(tmp_path / "app")
    stamp = fab_check.installation_stamp(app)
    (app / "client" / "__pycache__").mkdir()
    (app / "client" / "__pycache__" / "task.cpython-311.pyc").write_bytes(b"x")
    assert fab_check.installation_stamp(app) == stamp  # byte-code caches are not the installation
    worker.app_dir, worker.stamp, worker.checked = app, stamp, 0.0
    worker.exit_if_upgraded()  # unchanged: nothing happens
    worker.checked = 0.0
    (app / "client" / "task.py").write_text("x = 22\n")  # an upgrade
    with pytest.raises(SystemExit) as stopped:
        worker.exit_if_upgraded()
    assert stopped.value.code == worker_module.EXIT_UPGRADED
    assert "installed NEARL code" in capsys.readouterr().out


def test_after_an_upgrade_the_supervisor_accepts_the_new_bundle_instead_of_the_old(tmp_path, monkeypatch):
    from client import fab_check
    from client import supervisor as sv

    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps({"task_file": str(tmp_path / "task.json"), "site": "siteA",
                                     "app_dir": str(tmp_path), "own_fab": "a" * 64,
                                     "accepted_fabs": ["a" * 64, "c" * 64]}))
    monkeypatch.setattr(fab_check, "own_fab_hash", lambda app_dir: "b" * 64)
    sup = sv.Supervisor(spec_file)
    sup.accept_upgraded_bundle()
    saved = json.loads(spec_file.read_text())
    assert saved["accepted_fabs"] == ["b" * 64, "c" * 64] and saved["own_fab"] == "b" * 64  # --accept-fab kept
    assert os.stat(spec_file).st_mode & 0o777 == 0o600
