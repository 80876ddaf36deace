"""One federation, two engines: every option of simulation/run.py that applies to a federation goes through
nearl-server's real ``flwr run`` path and reaches the ServerApp with its value.

The options are enumerated from the simulation's parser (built from the settings' definitions and the shared
NEARL flags), not from a hand list: a new option fails here until it has a value to try.  The run has no sites,
so it ends after ``--wait-timeout``; the ServerApp's start event holds the settings it read and the resolved
config every instruction carries.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from nearl_core.config import CONFIG_DIR, config_sha256, load_config
from nearl_protocol.processes import free_port
from server.events import StartEvent, read_all, select
from server.options import dest_of
from server.settings import SERVER, setting_fields
from tests.fed_helpers import BIN, env

SIMULATION_ONLY = {"help", "sites", "alpha", "data", "seed", "out", "compare", "methods", "cpus_per_site",
                   "site_max_epsilon"}  # the virtual sites, the split, the arms: no federation setting
SECURE_ONLY = {"secure_aggregation"}  # SecAgg+ and client-level DP at the server exclude each other:
CENTRAL_DP = {"server_dp_noise", "server_dp_clip"}  # they go in separate runs


def federation_options() -> list:
    from simulation.run import build_parser

    return [a for a in build_parser()._actions if a.dest not in SIMULATION_ONLY]


def setting_value(f) -> Any:
    """A valid value other than the default, by the setting's type."""
    d = f.default
    if isinstance(d, bool):
        return not d
    if isinstance(d, int):
        return d + 1
    if isinstance(d, float):
        return 0.5 if d == 0 else round(d * 0.9 if d <= 1 else d * 2, 9)
    return next(c for c in f.metadata["choices"] if c != d)


def nearl_values(tmp: Path) -> dict[str, tuple[list[str], Any]]:
    """dest -> (its command-line words, a check of the resolved config), for every NEARL flag."""
    import open_clip
    import torch

    from nearl_core.backbone import register_shipped_configs

    config = tmp / "parity.yaml"
    raw = yaml.safe_load((CONFIG_DIR / "demo.yaml").read_text())
    raw["task"]["modality"] = "parity"
    config.write_text(yaml.safe_dump(raw))
    register_shipped_configs()
    torch.manual_seed(7)
    weights = tmp / "tiny.pt"
    torch.save(open_clip.create_model("nearl-tiny").state_dict(), weights)
    return {
        "config": (["--config", str(config)], lambda c: c["task"]["modality"] == "parity"),
        "overrides": (["--set", "train.loss=logit-adjusted"], lambda c: c["train"]["loss"] == "logit-adjusted"),
        "pretrained": (["--pretrained", str(weights)], lambda c: c["model"]["pretrained"] == str(weights)),
        "personalize": (["--personalize", "oca-text,gates"], lambda c: c["federation"]["local"] == ["oca-text", "gates"]),
        "finetune_epochs": (["--finetune-epochs", "1"], lambda c: c["federation"]["finetune-epochs"] == 1),
        "dp_epsilon": (["--dp-epsilon", "3"], lambda c: c["privacy"]["enabled"] and c["privacy"]["target-epsilon"] == 3),
        "dp_delta": (["--dp-delta", "1e-6"], lambda c: c["privacy"]["delta"] == 1e-6),
        "dp_max_grad_norm": (["--dp-max-grad-norm", "0.5"], lambda c: c["privacy"]["max-grad-norm"] == 0.5),
    }


def submit(tmp: Path, words: list[str], name: str) -> StartEvent:
    """nearl-server with no sites: the run is accepted, the ServerApp starts, then fails for want of sites."""
    port = free_port()
    cmd = [str(BIN / "nearl-server"), "--host", "127.0.0.1", "--port", str(port), "--insecure", "--min-sites", "1",
           "--wait-timeout", "1", "--checkpoint-dir", str(tmp / f"ckpt-{name}"), *words]
    done = subprocess.run(cmd, cwd=tmp, env=env(tmp / f"home-{name}"), capture_output=True, text=True, timeout=240)
    assert done.returncode == 1, done.stderr[-3000:]  # accepted: exit 2 would be a refused argument
    assert "1 required site" in done.stderr or "sites connected" in done.stderr, done.stderr[-2000:]
    kept = re.search(r"logs kept in (\S+)", done.stderr)
    assert kept, done.stderr[-2000:]
    (start,) = select(read_all(Path(kept.group(1)) / "progress.jsonl"), StartEvent)
    return start


@pytest.mark.slow
def test_every_simulation_option_reaches_the_server_app_through_nearl_server(tmp_path):
    from server.cli import build_parser as server_parser

    options = federation_options()
    server_flags = {s for a in server_parser()._actions for s in a.option_strings}
    assert [s for a in options for s in a.option_strings if s not in server_flags] == []  # same flags on both

    settings = {dest_of(f): f for f in setting_fields() if SERVER in f.metadata["on"]}
    nearl = nearl_values(tmp_path)
    dests = {a.dest for a in options}
    assert dests - set(settings) == set(nearl), "a NEARL flag without a value to try: add it to nearl_values"
    runs: dict[str, list[str]] = {"secure": [], "central": []}
    expected: dict[str, dict[str, Any]] = {"secure": {}, "central": {}}
    for action in options:
        if action.dest in nearl:
            runs["secure"] += nearl[action.dest][0]
            continue
        f = settings[action.dest]
        which = "central" if f.name in CENTRAL_DP else "secure"
        free_text = {"mlflow_uri": f"sqlite:///{tmp_path / 'parity.db'}", "mlflow_experiment": "parity"}
        value = free_text[f.name] if f.name in free_text else setting_value(f)
        flag = action.option_strings[0]
        runs[which] += ([flag if value else f"--no-{flag[2:]}"] if isinstance(value, bool) else [flag, str(value)])
        expected[which][f.name.replace("_", "-") if f.name != "num_rounds" else "num-server-rounds"] = value
    runs["central"] += ["--strategy", "fedprox", "--mlflow-uri", f"sqlite:///{tmp_path / 'parity.db'}",
                        "--set", "trim-beta=0.15"]  # --set of a federation setting
    expected["central"].update({"strategy": "fedprox", "trim-beta": 0.15})
    print("options tried:", " ".join(runs["secure"]), "|", " ".join(runs["central"]))

    for name, words in runs.items():
        start = submit(tmp_path, words, name)
        wrong = {k: (start.settings[k], v) for k, v in expected[name].items() if start.settings[k] != v}
        assert wrong == {}, f"{name}: setting -> (what the ServerApp read, what was given)"
        if name == "secure":
            failed = [dest for dest, (_, check) in nearl.items() if not check(start.config)]
            assert failed == []
            assert start.config_sha256 == config_sha256(load_config(start.settings["config"]))
