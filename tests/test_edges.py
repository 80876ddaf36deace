"""Integrity at the edges, as an operator sees it: exit code and the one line printed.

Damaged images, symbolic link loops, unreadable folders and one image in two splits
(``nearl check-data`` and ``nearl-client --check-only``); a damaged adapter file,
an adapter folder without checksum, and NaN/Inf outputs (``nearl evaluate`` /
``nearl predict``); an unreachable coordinator (``nearl-client --connect-timeout``).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from client import cli as client_cli
from conftest import tiny_model
from nearl_core.adapter_io import CHECKSUM_KEY, META_FILE, WEIGHTS_FILE, save_adapters
from nearl_core.cli import main as nearl_main
from test_data import RAW, write_dicom

# ---------------------------------------------------------------------------
# helpers


def nearl(capsys, *argv: str) -> tuple[int, str, str]:
    code = nearl_main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def client(capsys, *argv: str) -> tuple[int, str, str]:
    code = client_cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line(err: str, prefix: str) -> str:
    """The message of a single stderr line that starts with ``prefix``."""
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert err.startswith(prefix), err
    return err[len(prefix):].rstrip("\n")


def check_site(capsys, tool: str, site: Path) -> tuple[int, str]:
    """Run the site check of ``tool``; (exit code, the one-line error message)."""
    if tool == "nearl check-data":
        code, _, err = nearl(capsys, "check-data", "--data", str(site))
    else:
        code, _, err = client(capsys, "--site", "siteA", "--data", str(site), "--insecure", "--check-only")
    return code, one_line(err, f"{tool}: error: ")


def first_image(folder: Path) -> Path:
    return sorted(folder.iterdir())[0]


@pytest.fixture
def site(demo_root, tmp_path) -> Path:
    """A private copy of a demo site, to damage."""
    return Path(shutil.copytree(demo_root / "site1", tmp_path / "site"))


TOOLS = ["nearl check-data", "nearl-client"]

# ---------------------------------------------------------------------------
# site folders


@pytest.mark.parametrize("tool", TOOLS)
def test_good_site_passes_both_checks(capsys, tool, site):
    if tool == "nearl check-data":
        code, out, err = nearl(capsys, "check-data", "--data", str(site))
    else:
        code, out, err = client(capsys, "--site", "siteA", "--data", str(site), "--insecure", "--check-only")
    assert code == 0 and "OK" in out and err == ""


@pytest.mark.parametrize("tool", TOOLS)
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_image_cut_short(capsys, tool, site, fmt):
    bad = site / "train" / "nodule" / f"cut.{fmt.lower()}"
    noise = np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(bad, fmt)
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    code, message = check_site(capsys, tool, site)
    assert code == 2
    assert message.startswith(f"cannot read image {bad} (") and message.endswith("; replace or remove the file")


@pytest.mark.parametrize("tool", TOOLS)
def test_dicom_pixel_data_cut_short(capsys, tool, site):
    scan = write_dicom(site / "val" / "normal" / "scan.dcm", np.tile(RAW, (32, 4)))
    scan.write_bytes(scan.read_bytes()[:-64])
    code, message = check_site(capsys, tool, site)
    assert code == 2
    assert message.startswith(f"cannot decode pixel data of DICOM file {scan} (")
    assert "less than expected" in message and "replace the file if it was cut short" in message


@pytest.mark.parametrize("tool", TOOLS)
def test_symlink_loop(capsys, tool, site):
    loop = site / "train" / "normal" / "loop.png"
    loop.symlink_to(loop)
    assert check_site(capsys, tool, site) == (2, f"{loop} is a symbolic link loop; remove or fix the link")


@pytest.mark.parametrize("tool", TOOLS)
def test_folder_linking_back_to_the_site(capsys, tool, site):
    link = site / "test" / "opacity" / "all"
    link.symlink_to(site)
    code, message = check_site(capsys, tool, site)
    assert code == 2
    assert message == f"{link} links back to {os.path.realpath(site)}, a folder that contains it " \
                      "(a symbolic link loop); remove the link"


@pytest.mark.parametrize("tool", TOOLS)
def test_unreadable_folder(capsys, monkeypatch, tool, site):
    denied = site / "val" / "nodule"
    real_scandir = os.scandir

    def scandir(path):  # as for a folder without read permission (chmod has no effect for root)
        if Path(path) == denied:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr("nearl_core.data.os.scandir", scandir)
    code, message = check_site(capsys, tool, site)
    assert code == 2
    assert message == (f"cannot list folder {denied} (Permission denied); give the account running nearl "
                       "read access to it (e.g. chmod -R u+rX) or move it out of the site folder")


@pytest.mark.parametrize("tool", TOOLS)
@pytest.mark.parametrize("layout", ["folders", "manifest"])
def test_same_image_in_two_splits(capsys, tool, site, layout):
    original = first_image(site / "train" / "opacity")
    copy = site / "test" / "opacity" / "renamed-copy.png"
    shutil.copy(original, copy)
    if layout == "manifest":
        rows = ["path,label,split"] + [
            f"{p.relative_to(site)},{p.parent.name},{p.parent.parent.name}"
            for p in sorted(site.glob("*/*/*.png"))
        ]
        (site / "manifest.csv").write_text("\n".join(rows) + "\n")
    code, message = check_site(capsys, tool, site)
    assert code == 2
    assert message.startswith(f"the same image is in split 'train' as {original} and in split 'test' as {copy} ")
    assert message.endswith("; keep each image in one split only, or metrics will count training images")


# ---------------------------------------------------------------------------
# adapter folders


def adapters(folder: Path, fill: float | None = None) -> Path:
    """Adapters for the demo task; ``fill`` sets every adapter value (NaN, Inf) before saving."""
    model = tiny_model()
    if fill is not None:
        with torch.no_grad():
            for p in model.adapters.parameters():
                p.fill_(fill)
    return save_adapters(model, folder)


def run_on_adapters(capsys, command: str, folder: Path, demo_root: Path) -> tuple[int, str, str]:
    if command == "evaluate":
        return nearl(capsys, "evaluate", "--adapters", str(folder), "--data", str(demo_root / "site1"), "--json")
    image = first_image(demo_root / "site1" / "test" / "nodule")
    return nearl(capsys, "predict", "--adapters", str(folder), str(image), "--json")


@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_flipped_byte_in_adapter_weights(capsys, tmp_path, demo_root, command):
    folder = adapters(tmp_path / "a")
    weights = folder / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x40  # inside the last tensor: the file still parses
    weights.write_bytes(bytes(data))
    code, out, err = run_on_adapters(capsys, command, folder, demo_root)
    message = one_line(err, f"nearl {command}: error: ")
    assert code == 2 and out == ""
    assert message.startswith(f"{weights} is corrupt: its sha256 is ")
    assert message.endswith("copy the adapter folder again from where it was written, or retrain")


@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_adapters_without_checksum_work_with_one_warning(capsys, tmp_path, demo_root, command):
    folder = adapters(tmp_path / "a")
    meta = json.loads((folder / META_FILE).read_text())
    del meta[CHECKSUM_KEY]
    (folder / META_FILE).write_text(json.dumps(meta))
    code, out, err = run_on_adapters(capsys, command, folder, demo_root)
    message = one_line(err, f"nearl {command}: warning: ")
    assert code == 0 and out
    assert message == (f"{folder / META_FILE} records no sha256 of {WEIGHTS_FILE} (written by an older nearl), "
                       "so the weights are loaded unchecked; adapters written by this version carry one")


@pytest.mark.parametrize("command", ["evaluate", "predict"])
@pytest.mark.parametrize("fill", [math.nan, math.inf])
def test_nan_or_inf_outputs_are_an_error(capsys, tmp_path, demo_root, command, fill):
    folder = adapters(tmp_path / "a", fill)
    code, out, err = run_on_adapters(capsys, command, folder, demo_root)
    message = one_line(err, f"nearl {command}: error: ")
    assert code == 2 and "NaN" not in out and "nan" not in out.lower()
    assert message == (f"adapters {folder} give NaN or infinite outputs, so there is no prediction to report; "
                       "their training diverged or the weights are damaged: retrain (e.g. with a lower "
                       "train.lr) or use other adapters, and check --pretrained")


def test_finite_adapters_still_predict(capsys, tmp_path, demo_root):
    code, out, err = run_on_adapters(capsys, "predict", adapters(tmp_path / "a"), demo_root)
    probabilities = json.loads(out)[0]["probabilities"]
    assert code == 0 and err == "" and all(math.isfinite(p) for p in probabilities.values())


# ---------------------------------------------------------------------------
# reaching the coordinator


def closed_port() -> int:
    """A loopback port where nothing listens (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def no_exec(monkeypatch, tmp_path) -> list[list[str]]:
    """Record the SuperNode command instead of becoming it; keep Flower's home in tmp_path."""
    monkeypatch.setenv("NEARL_CLIENT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FLWR_HOME", raising=False)
    calls: list[list[str]] = []
    monkeypatch.setattr(client_cli.os, "execvpe", lambda file, args, env: calls.append(list(args)))
    return calls


def join(capsys, demo_root: Path, port: int, *extra: str) -> tuple[int, str, str]:
    return client(capsys, "--site", "siteA", "--data", str(demo_root / "site1"), "--insecure",
                  "--server", f"127.0.0.1:{port}", *extra)


def test_unreachable_coordinator_is_one_line_after_the_timeout(capsys, demo_root, no_exec):
    port = closed_port()
    start = time.monotonic()
    code, _, err = join(capsys, demo_root, port, "--connect-timeout", "2")
    elapsed = time.monotonic() - start
    message = one_line(err, "nearl-client: error: ")
    assert code == 69 and no_exec == []  # EXIT_DISCONNECTED: a service manager restarts the site (2: a setting to fix)
    assert 2 <= elapsed < 10
    assert message == (f"the coordinator at 127.0.0.1:{port} could not be reached within 2s (Connection refused); "
                       "check --server, that nearl-server is running there, and that a firewall lets this "
                       f"machine reach port {port}")


def test_reachable_coordinator_execs_the_supervisor_which_keeps_the_connect_timeout(capsys, demo_root, no_exec):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        code, out, err = join(capsys, demo_root, port, "--connect-timeout", "7.5")
    assert code == 0 and err == "" and "joining" in out and "warm: one site worker" in out
    assert "--connect-timeout 7.5)" in out
    [cmd] = no_exec
    assert cmd[1:3] == ["-m", "client.supervisor"]  # a warm site: the supervisor starts the SuperNode
    spec_file = Path(cmd[3])
    spec = json.loads(spec_file.read_text())
    node = spec["supernode_cmd"]
    assert node[1:3] == ["-m", "client.supernode"]  # flower-supernode, ending when its connection ends
    assert "--max-wait-time" not in node and spec["connect_timeout"] == 7.5  # the supervisor enforces it
    assert spec["mode"] == "warm" and spec["coordinator"] == f"127.0.0.1:{port}"
    assert node[node.index("--isolation") + 1] == "process" and node[node.index("--host") + 1] == "127.0.0.1"
    secret = Path(node[node.index("--superexec-auth-secret-file") + 1])
    assert secret == Path(spec["secret_file"]) and len(secret.read_bytes()) == 64
    for path in (secret, spec_file):
        assert path.stat().st_mode & 0o777 == 0o600, path
    assert spec_file.parent.stat().st_mode & 0o777 == 0o700
    assert spec["runtime_address"] == f"127.0.0.1:{node[node.index('--port') + 1]}"
    assert len(spec["accepted_fabs"]) == 1  # the bundle built from this installation


def test_cold_runs_the_stock_supernode_under_the_supervisor_and_says_it_runs_the_coordinators_code(
        capsys, demo_root, no_exec):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        code, out, _ = join(capsys, demo_root, listener.getsockname()[1], "--cold")
    assert code == 0 and "cold: every message runs in a new process with the code the coordinator sends" in out
    [cmd] = no_exec
    assert cmd[1:3] == ["-m", "client.supervisor"]
    spec = json.loads(Path(cmd[3]).read_text())
    node = spec["supernode_cmd"]
    assert spec["mode"] == "cold" and "--isolation" not in node and "secret_file" not in spec
    assert node[1:3] == ["-m", "client.supernode"] and spec["connect_timeout"] == 180


def test_accept_fab_takes_only_a_sha256(capsys, demo_root, no_exec):
    code, _, err = join(capsys, demo_root, closed_port(), "--accept-fab", "abc")
    assert code == 2 and no_exec == []
    assert "--accept-fab 'abc': give the app bundle's sha256" in err


@pytest.mark.parametrize("mode", ["--warm", "--cold"])
def test_threads_go_to_every_process_the_site_starts(capsys, demo_root, monkeypatch, tmp_path, mode):
    """--threads N is in the environment nearl-client execs with (SuperNode or supervisor, then the
    worker and cold ClientApps inherit it); without it the count is left to torch."""
    monkeypatch.setenv("NEARL_CLIENT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FLWR_HOME", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    envs: list[dict[str, str]] = []
    monkeypatch.setattr(client_cli.os, "execvpe", lambda file, args, env: envs.append(env))
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert join(capsys, demo_root, port, mode, "--threads", "1")[0] == 0
        assert join(capsys, demo_root, port, mode)[0] == 0
    assert envs[0]["OMP_NUM_THREADS"] == "1" and envs[0]["MKL_NUM_THREADS"] == "1"
    assert "OMP_NUM_THREADS" not in envs[1]


@pytest.mark.parametrize("value", ["0", "-2"])
def test_threads_must_be_positive(capsys, demo_root, no_exec, value):
    code, _, err = join(capsys, demo_root, closed_port(), "--threads", value)
    assert code == 2 and no_exec == []
    assert one_line(err, "nearl-client: error: ") == \
        f"--threads {value}: give a positive number of CPU threads, e.g. --threads 2"


def test_default_connect_timeout_is_bounded_and_zero_means_no_limit(capsys, demo_root, no_exec):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        assert join(capsys, demo_root, listener.getsockname()[1])[0] == 0
        first = json.loads(Path(no_exec[0][3]).read_text())
        code, out, _ = join(capsys, demo_root, listener.getsockname()[1], "--connect-timeout", "0")
    assert code == 0 and "no limit (--connect-timeout 0)" in out
    forever = json.loads(Path(no_exec[1][3]).read_text())
    assert first["connect_timeout"] == 180 and forever["connect_timeout"] is None


@pytest.mark.parametrize("value", ["-5", "nan"])
def test_connect_timeout_must_be_a_number_of_seconds(capsys, demo_root, no_exec, value):
    code, _, err = join(capsys, demo_root, closed_port(), "--connect-timeout", value)
    assert code == 2 and no_exec == []
    assert one_line(err, "nearl-client: error: ") == \
        f"--connect-timeout {float(value)}: give a number of seconds, e.g. 180 (0: no limit)"


def test_without_a_limit_the_start_waits_and_says_so(monkeypatch, capsys):
    """--connect-timeout 0 at start: no error however long it takes, and a line while it waits."""
    from client import connection

    port = closed_port()
    opened = []

    def connect(address, timeout):
        opened.append(timeout)
        if len(opened) < 3:
            raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
        return contextlib.nullcontext()

    monkeypatch.setattr(connection.socket, "create_connection", connect)
    monkeypatch.setattr(connection, "STATUS_FIRST", 0.0)
    connection.wait_for_coordinator(f"127.0.0.1:{port}", 0, interval=0.01)
    out = capsys.readouterr().out
    assert len(opened) == 3 and f"waiting for the coordinator at 127.0.0.1:{port}" in out
    assert "(Connection refused; no limit (--connect-timeout 0))" in out, out


@pytest.mark.parametrize("mode", ["--cold", "--warm"])
def test_a_site_that_never_reaches_its_coordinator_exits_69_after_the_connect_timeout(
        tmp_path, demo_root, monkeypatch, mode):
    """The supervisor (and with it the SuperNode and worker) ends by itself when no coordinator answers, with
    one line and EXIT_DISCONNECTED, so that a service manager starts it again."""
    monkeypatch.setenv("NEARL_CLIENT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FLWR_HOME", raising=False)
    port = closed_port()
    args = client_cli.build_parser().parse_args(
        ["--site", "siteA", "--data", str(demo_root / "site1"), "--insecure",
         "--server", f"127.0.0.1:{port}", "--connect-timeout", "2", mode])
    cmd, env = client_cli.prepare(args)
    cmd = client_cli.supervisor_command(args, cmd, env)
    log = tmp_path / "supernode.log"
    start = time.monotonic()
    with log.open("w") as sink:  # a file, not a pipe: the SuperNode's own child may outlive it briefly
        proc = subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        code = proc.wait(timeout=90)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the session this test started, children included
    text = log.read_text()
    assert code == 69, text
    assert time.monotonic() - start < 60
    assert (f"nearl-client: error: no connection to the coordinator at 127.0.0.1:{port} for 2s (--connect-timeout 2; "
            "Connection refused); stopping this site with exit status 69") in text, text
    assert not (tmp_path / "home" / "state" / "runtime" / "status.json").exists()
