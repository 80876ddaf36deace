"""nearl-server with two real nearl-client sites keeps its best round and stops early (slow: real processes).

Site learning rate 0.05 (about 17x the demo's) makes the federated validation go up and down
on the tiny demo data.  ``--rounds 5 --patience 1 --no-eval-in-train``: each round's own
evaluate message validates it, so the run stops right after the first round that does not
beat the best, and the kept round is then before the last one by construction (with in-train
evaluation the last round is validated after the stop and may still win: the simulation
tests cover that path).  The run must keep the best round by the default metric, balanced
accuracy, test it at the sites, write it as the final adapters with the last round's beside
them, and register it with the selected round as a tag.  The assertions derive the expected
round from the run's own MLflow history, so they state the rule, not a lucky number.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from safetensors.numpy import load_file

from nearl_core.demo_data import generate_demo_data
from nearl_protocol import processes as flower
from server.checkpoint import complete_rounds
from tests.fed_helpers import Procs, dump, history, mlflow_run, nearl_client, nearl_server, wait_for

pytestmark = [pytest.mark.slow]


def best_round(values: dict[int, float]) -> int:
    """The selection rule restated: the highest value over trained rounds, the earliest on a tie."""
    top = max(values.values())
    return min(r for r, v in values.items() if v == top)


def same(folder_a, folder_b) -> bool:
    a, b = load_file(str(folder_a / "adapters.safetensors")), load_file(str(folder_b / "adapters.safetensors"))
    return set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.timeout(1800)
def test_nearl_server_keeps_the_best_validated_round_stops_with_patience_and_registers_that_round(tmp_path):
    procs = Procs(tmp_path / "logs")
    sites = generate_demo_data(tmp_path / "data", 2, train_per_site=24, val_per_site=8, test_per_site=8)
    ck, uri = tmp_path / "ck", f"sqlite:///{tmp_path / 'mlflow.db'}"
    try:
        port = flower.free_port()
        nearl_server(procs, port, tmp_path, "--insecure", "--rounds", "5", "--patience", "1", "--min-sites", "2",
                     "--round-timeout", "900", "--wait-timeout", "300", "--checkpoint-dir", str(ck),
                     "--keep-checkpoints", "0", "--mlflow-uri", uri, "--no-eval-in-train", "--set", "train.lr=0.05")
        wait_for(procs, "server", "submitted", 300)
        for i, site in enumerate(sites, 1):
            nearl_client(procs, f"site{i}", site, port, tmp_path, "--insecure", "--state-dir",
                         str(tmp_path / f"state-site{i}"))
        assert procs.wait("server", 1500) == 0, dump(procs)
    finally:
        procs.stop_all()
    out = procs.text("server")
    client, run = mlflow_run(uri)
    rid = run.info.run_id
    val = history(client, rid, "eval_balanced_accuracy")
    last = max(complete_rounds(ck))
    print(out, "\nvalidation balanced accuracy by round:", val)

    assert last < 5 and set(val) == set(range(1, last + 1))  # stopped early; every round that ran was validated
    selected = best_round(val)
    assert selected == last - 1 and val[last] <= val[selected]  # patience 1: one round without improvement
    stop = re.search(r"stopped early after round (\d+): validation balanced accuracy has not improved for 1 "
                     r"round\(s\) since round (\d+) \(", out)
    assert stop and int(stop.group(1)) == last, out
    closing = "\n".join(out.strip().splitlines()[-3:])  # nearl-server's last lines
    assert f"selected round {selected} (balanced accuracy {val[selected]:.3f})" in closing, out
    assert f"done: final adapters in {(ck / 'final').resolve()} (round {selected}); the last round's ({last})" in out

    assert same(ck / "final", ck / f"round-{selected:04d}") and same(ck / "last", ck / f"round-{last:04d}")
    assert not same(ck / "final", ck / "last")
    (version,) = client.search_model_versions("name='nearl-adapters'")
    assert (version.tags["selected_round"], version.tags["select_by"], version.tags["rounds"]) == (
        str(selected), "balanced-accuracy", str(last))
    assert float(version.tags["selected_value"]) == pytest.approx(val[selected], rel=1e-5)
    assert version.tags["stopped_early"].startswith("validation balanced accuracy has not improved")
    assert run.data.tags["selected_round"] == str(selected)
    assert set(history(client, rid, "test_accuracy")) == {selected}  # the test split: the kept round only
    assert set(history(client, rid, "site1/personal_accuracy")) == {selected}  # personalized from it
    assert set(history(client, rid, "train_loss")) == set(range(1, last + 1))  # no round after the stop
