"""The consortium roster: making it, reading it, and what nearl-client and nearl-server refuse at start.

Every refusal is one line naming the fix, exit status 2, before any process starts.  The
coordinator's own use of the roster in a secure round (dropping a site whose signed keys
fail, instead of letting every honest site refuse the round) is checked in process.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from client import cli as client_cli
from nearl_core.errors import ConfigError
from nearl_protocol.roster import RosterError, load_roster, make_roster
from server.screening import load_registry
from server.secagg import SecAggSettings
from tests.secagg_fakes import make_ca, make_sites, run_round, site_key, with_roster

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def consortium(tmp_path) -> tuple[Path, Path, Path]:
    """(certs folder with ca.crt, keys folder with siteA/siteB/siteC and their .pub, roster.json of the three)."""
    ca = make_ca(tmp_path / "certs")
    for name in ("siteA", "siteB", "siteC"):
        site_key(tmp_path / "keys", name)
    roster = tmp_path / "roster.json"
    roster.write_text(json.dumps(make_roster(ca, sorted((tmp_path / "keys").glob("*.pub")))))
    return ca.parent, tmp_path / "keys", roster


def test_make_roster_sh_writes_names_keys_fingerprints_and_the_ca(consortium, tmp_path):
    certs, keys_dir, _ = consortium
    out = tmp_path / "made.json"
    env = {**os.environ, "NEARL_PYTHON": os.environ.get("NEARL_PYTHON", __import__("sys").executable)}
    res = subprocess.run([str(ROOT / "deploy" / "make-roster.sh"), "--out", str(out), "--ca", str(certs / "ca.crt"),
                          *map(str, sorted(keys_dir.glob("*.pub")))], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    roster = load_roster(out)
    assert sorted(roster.members) == ["siteA", "siteB", "siteC"] and len(roster.ca_sha256) == 64
    assert f"roster sha256 {roster.digest}" in res.stdout
    again = subprocess.run([str(ROOT / "deploy" / "make-roster.sh"), "--out", str(out), "--ca",
                            str(certs / "ca.crt"), str(keys_dir / "siteA.pub")], capture_output=True, text=True,
                           env=env, timeout=120)
    assert again.returncode == 2 and again.stderr.strip() == f"make-roster.sh: error: {out} already exists; " \
                                                              "pass --force to replace it"


def test_a_key_given_twice_or_an_edited_roster_is_refused(consortium, tmp_path):
    certs, keys_dir, roster = consortium
    (tmp_path / "copy").mkdir()
    twin = tmp_path / "copy" / "siteD.pub"
    twin.write_text((keys_dir / "siteA.pub").read_text())
    with pytest.raises(RosterError, match="the same key as siteA.pub; every site needs its own key"):
        make_roster(certs / "ca.crt", [keys_dir / "siteA.pub", twin])
    raw = json.loads(roster.read_text())
    raw["sites"]["siteB"]["public_key"] = raw["sites"]["siteC"]["public_key"]
    roster.write_text(json.dumps(raw))
    with pytest.raises(RosterError, match="siteB's sha256 does not match its public key; the file was edited"):
        load_roster(roster)
    with pytest.raises(RosterError, match="is not JSON"):
        roster.write_text("{")
        load_roster(roster)


# -- nearl-client --roster --------------------------------------------------------------------------------
def client(capsys, *argv: str) -> tuple[int, str]:
    code = client_cli.main(list(argv))
    return code, capsys.readouterr().err


@pytest.mark.parametrize("site, key, extra, line", [
    ("siteD", "siteA", (), "--roster {roster} does not name site siteD (it names siteA, siteB, siteC); ask the "
                           "consortium to add siteD.pub (deploy/make-roster.sh) or fix --site"),
    ("siteA", "siteB", (), "--auth-key {keys}/siteB is not site siteA's key on the roster {roster} (sha256 "),
    ("siteA", None, (), "--roster needs this site's --auth-key KEY: the site signs its secure-aggregation keys "
                        "with it"),
    ("siteA", "siteA", ("--min-secure-sites", "9"), "--min-secure-sites 9: give 2 to 3 (the roster's sites), e.g. 3"),
], ids=["site-not-on-roster", "another-sites-key", "no-auth-key", "minimum-above-roster"])
def test_nearl_client_refuses_a_roster_that_does_not_pin_this_site(consortium, demo_root, capsys, site, key, extra,
                                                                    line):
    certs, keys_dir, roster = consortium
    auth = ["--auth-key", str(keys_dir / key)] if key else []
    code, err = client(capsys, "--site", site, "--data", str(demo_root / "site1"), "--certs", str(certs), *auth,
                       "--roster", str(roster), *extra, "--check-only")
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("nearl-client: error: " + line.format(roster=roster.resolve(), keys=keys_dir.resolve())), err


def test_nearl_client_refuses_a_roster_of_another_ca_and_a_minimum_without_roster(consortium, demo_root, capsys,
                                                                                 tmp_path):
    _, keys_dir, roster = consortium
    other = make_ca(tmp_path / "other").parent
    code, err = client(capsys, "--site", "siteA", "--data", str(demo_root / "site1"), "--certs", str(other),
                       "--auth-key", str(keys_dir / "siteA"), "--roster", str(roster), "--check-only")
    assert code == 2 and "but " + str(other / "ca.crt") + " is another; get the roster and ca.crt of the same " \
                                                            "federation" in err and err.count("\n") == 1
    code, err = client(capsys, "--site", "siteA", "--data", str(demo_root / "site1"), "--insecure",
                       "--min-secure-sites", "3", "--check-only")
    assert code == 2 and err == ("nearl-client: error: --min-secure-sites counts roster members: give the "
                                 "consortium roster with --roster FILE\n")


def test_the_roster_reaches_the_handlers_through_the_node_config(consortium, demo_root, capsys, monkeypatch, tmp_path):
    from client.binding import site_binding
    from client.secagg_auth import site_auth

    certs, keys_dir, roster = consortium
    monkeypatch.setenv("NEARL_CLIENT_HOME", str(tmp_path / "home"))
    args = client_cli.build_parser().parse_args(["--site", "siteA", "--data", str(demo_root / "site1"), "--certs",
                                                 str(certs), "--auth-key", str(keys_dir / "siteA"), "--roster",
                                                 str(roster), "--min-secure-sites", "2", "--cold"])
    monkeypatch.setattr(client_cli, "backbone_fingerprint_of", lambda cfg: "-")
    cmd, _ = client_cli.prepare(args)
    config = cmd[cmd.index("--node-config") + 1]
    assert f'roster="{roster.resolve()}"' in config and "min-secure-sites=2" in config
    pairs = dict(part.split("=", 1) for part in config.split(" "))
    auth = site_auth(site_binding({k: v.strip('"') for k, v in pairs.items()}))
    assert auth.site == "siteA" and auth.min_sites == 2 and auth.roster.digest == load_roster(roster).digest


# -- nearl-server --roster and the registry ------------------------------------------------------------------
def test_nearl_server_refuses_a_site_key_that_is_not_on_the_roster(consortium, capsys, tmp_path):
    from server.cli import main

    certs, keys_dir, roster = consortium
    site_key(keys_dir, "siteX")
    assert main(["--certs", str(certs), "--auth-keys", str(keys_dir), "--roster", str(roster), "--checkpoint-dir",
                 str(tmp_path / "ck")]) == 2
    err = capsys.readouterr().err
    assert err == (f"nearl-server: error: --auth-keys {keys_dir / 'siteX.pub'}: site key of siteX is not on the "
                   "roster; add it to the roster (deploy/make-roster.sh) or remove it from --auth-keys\n")
    assert main(["--insecure", "--roster", str(roster), "--checkpoint-dir", str(tmp_path / "ck")]) == 2
    assert capsys.readouterr().err == ("nearl-server: error: --roster needs --auth-keys DIR: the roster pins the "
                                       "sites' SuperNode keys\n")


def test_the_servers_site_registry_must_agree_with_the_roster(consortium, tmp_path):
    _, keys_dir, roster = consortium

    def entry(name: str, node: int) -> dict:
        return {"public_key": (keys_dir / f"{name}.pub").read_text().strip(), "node_id": node}
    registry = tmp_path / "site-registry.json"
    registry.write_text(json.dumps({"sites": {"siteA": entry("siteA", 1), "siteB": entry("siteB", 2)}}))
    assert load_registry(registry, roster) == {1: "siteA", 2: "siteB"}
    registry.write_text(json.dumps({"sites": {"siteA": entry("siteB", 1)}}))
    with pytest.raises(ConfigError, match="this key is site siteB's on the roster, not siteA's"):
        load_registry(registry, roster)


# -- the coordinator with the roster in a secure round -------------------------------------------------------
@pytest.mark.usefixtures("task_identity")
def test_a_coordinator_with_the_roster_drops_a_site_whose_key_is_not_on_it_and_the_round_goes_on(tmp_path):
    sites = make_sites(tmp_path, 5)
    roster = with_roster(tmp_path, sites)
    with_roster(tmp_path / "own", sites[4:], ca=tmp_path / "certs" / "ca.crt")  # site5 pins a roster of its own key
    settings = SecAggSettings(threshold=0.6, clip=0.1, roster=load_roster(roster))
    _, report, _, strategy = run_round(sites, secure=settings)
    assert report.aggregated and strategy.secure.current.dropped["setup"] == [5]
    assert not any(s.refusals() for s in sites)
    _, report, _, _ = run_round(sites, secure=SecAggSettings(threshold=0.6, clip=0.1), server_round=2)
    assert not report.aggregated  # without it, every honest site refuses the round
    assert all("which is not on the roster" in s.refusals()[-1] for s in sites[:4])


def test_the_deploy_scripts_pass_the_roster_and_refuse_a_missing_one(tmp_path):
    certs, key = tmp_path / "certs", tmp_path / "site-key"
    certs.mkdir()
    for f in ("ca.crt", "server.pem", "server.key"):
        (certs / f).write_text("x")
    key.write_text("x")
    (tmp_path / "siteA.pub").write_text("x")
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), "NEARL_CERTS": str(certs),
            "NEARL_ROSTER": str(tmp_path / "none.json")}
    for script, env in (("site.sh", {"NEARL_SITE": "siteA", "NEARL_SERVER": "x:1", "NEARL_AUTH_KEY": str(key)}),
                        ("coordinator.sh", {"NEARL_AUTH_KEYS": str(tmp_path)})):
        res = subprocess.run(["bash", str(ROOT / "deploy" / "run" / script)], env={**base, **env},
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 2 and res.stderr == (f"{script}: NEARL_ROSTER={tmp_path / 'none.json'} not found; "
                                                      "mount the consortium's roster.json (deploy/make-roster.sh)\n")
