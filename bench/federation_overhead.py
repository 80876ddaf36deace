"""Bench e: federation overhead per round on loopback: round wall time minus the slowest site's compute.

    python bench/federation_overhead.py                 # 4 rounds, 2 sites, tiny demo model
    python bench/federation_overhead.py --rounds 3      # quicker

Engine: the deployment path, not the simulation.  A real ``nearl-server`` (SuperLink +
ServerApp) and two real ``nearl-client`` processes (SuperNodes) on 127.0.0.1, insecure,
the embedded ``demo`` config (tiny CLIP, random init), 24 training images per site,
1 local epoch, MLflow in a private sqlite file; the same set-up as
tests/test_federation_e2e.py.

NEARL runs twice: ``nearl-client --cold`` (Flower's stock execution, a ``flwr-clientapp``
process per message) and warm (the default: one site worker per site that keeps the
backbone between messages, docs/federation.md "How a site executes messages").

What is measured, per round r, from the federation's own MLflow run:

* round wall time: the time between the round-end records of rounds r-1 and r (MLflow
  timestamps of ``round_seconds``), i.e. everything the server does in a round,
  including its own logging and checkpointing; the strategy's ``round_seconds``
  (configure_train -> aggregate_evaluate) is shown beside it;
* site compute: ``<site>/train_seconds``, which each site reports in its train reply:
  the time inside the train handler (build the model, evaluate the incoming adapters,
  train, collect metrics).  It does not include the start of the ``flwr-clientapp``
  process and its imports (torch, open_clip), which Flower pays for every message;
* overhead = round wall time - max over sites of site compute.

Round 1 also waits for the sites to connect and the last round also carries the
final evaluate message (whose compute the sites do not report), so the headline is
the median over the rounds in between.

With ``--simulation`` (run_all passes it) the same rounds also run on the Simulation
Engine (simulation/run.py: Ray actors that stay alive, no process per message), with a
second RESULT line whose baseline is the slowest site's compute.

Baseline of the deployment measurement, same engine, same machine, same run of this
script: the latency floor of Flower itself, measured with a trivial Flower app (written to a temp folder) whose
ServerApp sends one small message per round to the same two SuperNodes and whose
ClientApp replies at once (it imports only flwr).  The target (< 1 s) is absolute.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import exit_on_sigterm, kill_tree, load_average, machine, result

TARGET_S = 1.0  # cold overhead per round (Flower's process per message; kept from the first version)
WARM_TARGET_S = 3.0  # warm overhead per round, tiny demo model
WARM_VS_TRIVIAL_TARGET = 1.0  # warm NEARL overhead per round no larger than the trivial app's round
BIN = Path(sys.executable).parent

FLOOR_PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "nearl-bench-floor"
version = "1.0.0"
description = "A trivial Flower app: the latency floor of the engine"
dependencies = ["flwr"]

[tool.setuptools]
py-modules = ["floor_app"]

[tool.flwr.app]
publisher = "nearl"

[tool.flwr.app.components]
serverapp = "floor_app:server"
clientapp = "floor_app:client"

[tool.flwr.app.config]
rounds = 4
min-nodes = 2
out = ""
"""

FLOOR_APP = '''\
"""Trivial Flower app: one tiny message per node per round, answered at once."""

import json
import time

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

server = ServerApp()
client = ClientApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    rounds, need, out = int(context.run_config["rounds"]), int(context.run_config["min-nodes"]), context.run_config["out"]
    while len(list(grid.get_node_ids())) < need:
        time.sleep(0.5)
    nodes = list(grid.get_node_ids())
    rows = []
    for r in range(1, rounds + 1):
        start = time.perf_counter()
        msgs = [Message(content=RecordDict({"config": ConfigRecord({"round": r})}), dst_node_id=n,
                        message_type="train") for n in nodes]
        replies = list(grid.send_and_receive(msgs, timeout=600))
        ok = sum(1 for m in replies if m.has_content())
        rows.append({"round": r, "seconds": time.perf_counter() - start, "replies": ok, "time": time.time()})
    with open(out, "w") as fh:
        json.dump(rows, fh)


@client.train()
def train(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)
'''


def _wait(pred, timeout: float, what: str, procs=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.5)
    raise TimeoutError(f"{what} not reached within {timeout:.0f}s")


# -- the trivial app on the same engine ---------------------------------------------------------------------
def floor_rounds(tmp: Path, rounds: int, sites: int) -> list[dict]:
    from nearl_protocol import processes as flower

    app = tmp / "floor-app"
    app.mkdir()
    (app / "pyproject.toml").write_text(FLOOR_PYPROJECT)
    (app / "floor_app.py").write_text(FLOOR_APP)
    out = tmp / "floor.json"
    port = flower.free_port()
    procs = []
    try:
        link = flower.start_process(flower.superlink_command(host="127.0.0.1", port=port, certs=None, database=None),
                                    env=flower.flower_env(tmp / "floor-home-link"), log_file=tmp / "floor-link.log",
                                    cwd=tmp)
        procs.append(link)
        flower.wait_for_port("127.0.0.1", port, link, tmp / "floor-link.log", "SuperLink")
        for i in range(sites):
            cmd = flower.supernode_command(superlink=f"127.0.0.1:{port}", port=flower.free_port(),
                                           node_config={"site": f"floor{i + 1}"}, certs=None)
            procs.append(flower.start_process(cmd, env=flower.flower_env(tmp / f"floor-home-{i}"),
                                              log_file=tmp / f"floor-node{i}.log", cwd=tmp))
        home = tmp / "floor-home-cli"
        flower.write_connection(home, f"127.0.0.1:{port}", None)
        env = flower.flower_env(home)
        run_cfg = flower.write_run_config(tmp / "floor-run.toml", {"rounds": rounds, "min-nodes": sites,
                                                                    "out": str(out)})
        run_id = str(flower.flwr_json(["run", str(app), flower.CONNECTION, "--run-config", str(run_cfg)],
                                      env=env, timeout=300)["run-id"])
        status = ""
        deadline = time.monotonic() + 900
        while not status.startswith("finished"):
            if time.monotonic() > deadline:
                raise TimeoutError("the trivial app did not finish within 900 s")
            time.sleep(2.0)
            status, _ = flower.run_status(run_id, env=env)
        if status != "finished:completed" or not out.exists():
            raise RuntimeError(f"trivial app run ended {status}: {flower.run_logs(run_id, env=env)}")
        return json.loads(out.read_text())
    finally:
        for p in reversed(procs):
            flower.stop_process(p)


# -- NEARL: nearl-server + nearl-client ----------------------------------------------------------------------
def site_threads(sites: int) -> int:
    """The sites share this machine's cores: each gets cores / sites (docs/federation.md, --threads)."""
    return max(1, (os.cpu_count() or 1) // sites)


def nearl_rounds(tmp: Path, rounds: int, sites: int, mode: str = "--warm", config: tuple[str, ...] = (),
                 images: int = 24) -> list[dict]:
    """One NEARL federation; ``mode`` = ``--warm`` (a site worker per site) or ``--cold`` (a process per message).

    ``config``: extra nearl-server arguments choosing the model (default: the demo config);
    ``images``: training images per site.
    """
    from nearl_core.demo_data import generate_demo_data
    from nearl_protocol import processes as flower

    tmp = tmp / mode.strip("-")
    tmp.mkdir()
    roots = generate_demo_data(tmp / "data", sites, train_per_site=images, val_per_site=max(4, images // 3),
                               test_per_site=max(4, images // 3))
    port = flower.free_port()
    db = tmp / "mlflow.db"
    server_log = tmp / "server.log"
    procs = []
    try:
        server = flower.start_process(
            [str(BIN / "nearl-server"), "--host", "127.0.0.1", "--port", str(port), "--insecure", "--rounds",
             str(rounds), "--min-sites", str(sites), "--local-epochs", "1", "--round-timeout", "900",
             "--wait-timeout", "300", "--checkpoint-dir", str(tmp / "ck"), "--mlflow-uri", f"sqlite:///{db}", *config],
            env=flower.flower_env(tmp / "home-server"), log_file=server_log, cwd=tmp)
        procs.append(server)
        _wait(lambda: "submitted" in server_log.read_text(errors="replace") if server_log.exists() else False,
              300, "nearl-server submitted the run")
        for i, root in enumerate(roots, 1):
            procs.append(flower.start_process(
                [str(BIN / "nearl-client"), "--site", f"site{i}", "--data", str(root), "--server",
                 f"127.0.0.1:{port}", "--insecure", "--state-dir", str(tmp / f"state-site{i}"), mode,
                 "--threads", str(site_threads(sites))],
                env=flower.flower_env(tmp / f"home-site{i}"), log_file=tmp / f"site{i}.log", cwd=tmp))
        try:
            code = server.wait(timeout=1800)
        except Exception:
            raise TimeoutError(f"nearl-server did not finish; log tail:\n{flower.tail(server_log, 30)}") from None
        if code != 0:
            raise RuntimeError(f"nearl-server exited {code}:\n{flower.tail(server_log, 30)}")
    finally:
        for p in reversed(procs):
            flower.stop_process(p, timeout=30)
    return read_mlflow_rounds(f"sqlite:///{db}", [f"site{i}" for i in range(1, sites + 1)])


def simulation_rounds(tmp: Path, rounds: int, sites: int) -> list[dict]:
    """The same measurement on the Simulation Engine (simulation/run.py: Ray actors, no process per message)."""
    from common import ROOT

    work = tmp / "simulation"
    work.mkdir()
    db = work / "mlflow.db"
    cmd = [sys.executable, str(ROOT / "simulation" / "run.py"), "--sites", str(sites), "--rounds", str(rounds),
           "--local-epochs", "1", "--out", str(work / "out"), "--mlflow-uri", f"sqlite:///{db}"]
    with open(work / "run.log", "w") as fh:
        proc = subprocess.Popen(cmd, cwd=work, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"}, start_new_session=True)
        try:
            code = proc.wait(timeout=1800)
        except BaseException:
            kill_tree(proc.pid)
            proc.wait()
            raise
    if code != 0:
        raise RuntimeError(f"simulation/run.py exited {code}:\n{(work / 'run.log').read_text()[-3000:]}")
    return read_mlflow_rounds(f"sqlite:///{db}", [f"site{i}" for i in range(1, sites + 1)])


def import_seconds(module: str = "client.app", repeats: int = 2) -> float:
    """Median wall time of a fresh interpreter importing ``module``: what every flwr-clientapp process pays."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", f"import {module}"], check=True, capture_output=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def read_mlflow_rounds(uri: str, sites: list[str]) -> list[dict]:
    from mlflow.tracking import MlflowClient

    from nearl_protocol import keys

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("nearl-federated")
    run = client.search_runs([exp.experiment_id])[0]
    rid = run.info.run_id
    hist = lambda key: {m.step: m for m in client.get_metric_history(rid, key)}  # noqa: E731
    strategy = hist(keys.MLFLOW_ROUND_SECONDS)
    per_site = {s: hist(f"{s}/{keys.MLFLOW_TRAIN_SECONDS}") for s in sites}
    rows, previous_end = [], run.info.start_time
    for r in sorted(strategy):
        end = strategy[r].timestamp
        compute = {s: per_site[s][r].value for s in sites if r in per_site[s]}
        rows.append({"round": r, "wall": (end - previous_end) / 1000, "strategy": strategy[r].value,
                     "site_compute": compute, "slowest": max(compute.values()) if compute else float("nan")})
        previous_end = end
    return rows


def vit_b16_config(folder: Path) -> Path:
    """configs/vit-b16.yaml with random weights, batch 8 and the demo data's classes (a YAML file: a
    class list does not pass through Flower's run config)."""
    import yaml

    from common import ROOT

    cfg = yaml.safe_load((ROOT / "configs" / "vit-b16.yaml").read_text())
    cfg["model"]["pretrained"] = None
    cfg["train"]["batch-size"] = 8
    cfg["task"]["classes"] = ["normal", "nodule", "opacity"]
    path = folder / "vit-b16-bench.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def vit_b16(args: argparse.Namespace) -> int:
    """Warm vs cold on the full-size model: what a site saves by not rebuilding ViT-B-16 per message."""
    print(f"# warm vs cold on ViT-B-16 (random init), {args.sites} sites, {args.rounds} rounds x 1 local epoch, "
          f"8 training images per site, loopback, --threads {site_threads(args.sites)} per site")
    print(f"# machine: {machine()}; device cpu; load average {load_average()}", flush=True)
    walls = {}
    with tempfile.TemporaryDirectory(prefix="nearl-bench-fed-vit-") as tmp_s:
        tmp = Path(tmp_s) if args.workdir is None else args.workdir.resolve()
        tmp.mkdir(parents=True, exist_ok=True)
        config = ("--config", str(vit_b16_config(tmp)))
        for mode in ("--cold", "--warm"):
            rows = nearl_rounds(tmp, args.rounds, args.sites, mode, config, images=8)
            for n in rows:
                print(f"{mode[2:]:>4} round {n['round']}: wall {n['wall']:.1f}s, slowest site compute "
                      f"{n['slowest']:.1f}s")
            walls[mode] = statistics.median(n["wall"] for n in rows[1:])  # round 1 also waits for the sites
    print(f"# load average now {load_average()}; rounds after the first (the last one carries the final evaluate)")
    result("federation_round_vit_b16_warm_vs_cold", walls["--warm"], walls["--cold"], 1.0, on="ratio", unit="s")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4, help="rounds per run (>= 3; default 4)")
    ap.add_argument("--sites", type=int, default=2)
    ap.add_argument("--simulation", action="store_true",
                    help="also measure the same rounds on the Simulation Engine (printed, no RESULT line)")
    ap.add_argument("--vit-b16", action="store_true",
                    help="instead: warm vs cold round wall time on ViT-B-16 (random init, CPU), 8 images per site")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="keep logs, data and the MLflow file here (default: a temp folder, removed)")
    args = ap.parse_args(argv)
    if args.vit_b16:
        return vit_b16(args)
    if args.rounds < 3:
        ap.error("--rounds must be >= 3 (the first and last rounds are not representative)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    exit_on_sigterm()
    print("# federation overhead: nearl-server + nearl-client on loopback (deployment engine), "
          f"{args.sites} sites, demo config (nearl-tiny), {args.rounds} rounds x 1 local epoch, "
          f"--threads {site_threads(args.sites)} per site")
    print(f"# machine: {machine()}; device cpu; load average {load_average()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="nearl-bench-fed-") as tmp_s:
        tmp = Path(tmp_s)
        if args.workdir is not None:
            tmp = args.workdir.resolve()
            tmp.mkdir(parents=True, exist_ok=False)
        t0 = time.perf_counter()
        floor = floor_rounds(tmp, args.rounds, args.sites)
        t1 = time.perf_counter()
        nearl = nearl_rounds(tmp, args.rounds, args.sites, "--cold")
        t2 = time.perf_counter()
        warm = nearl_rounds(tmp, args.rounds, args.sites, "--warm")
        t3 = time.perf_counter()
        sim = simulation_rounds(tmp, args.rounds, args.sites) if args.simulation else None
        imports = import_seconds()
    print(f"# trivial app run {t1 - t0:.0f}s, NEARL cold run {t2 - t1:.0f}s, NEARL warm run {t3 - t2:.0f}s "
          f"(including start-up); load average now {load_average()}")
    middle = slice(1, args.rounds - 1)
    floor_s = statistics.median(f["seconds"] for f in floor[middle])
    summary = {}
    for label, rows in (("cold (a flwr-clientapp process per message)", nearl),
                        ("warm (one site worker per site)", warm)):
        print(f"\nNEARL {label}")
        print(f"{'round':>5}  {'floor (s)':>9}  {'NEARL wall (s)':>14}  {'strategy (s)':>12}  "
              f"{'slowest site (s)':>16}  {'overhead (s)':>12}  site compute")
        for f, n in zip(floor, rows):
            n["overhead"] = n["wall"] - n["slowest"]
            sites = " ".join(f"{s}={v:.2f}" for s, v in sorted(n["site_compute"].items()))
            print(f"{n['round']:>5}  {f['seconds']:>9.2f}  {n['wall']:>14.2f}  {n['strategy']:>12.2f}  "
                  f"{n['slowest']:>16.2f}  {n['overhead']:>12.2f}  {sites}")
        summary[label.split()[0]] = (statistics.median(n["overhead"] for n in rows[middle]),
                                     statistics.median(n["wall"] for n in rows[middle]))
    overhead, cold_wall = summary["cold"]
    warm_overhead, warm_wall = summary["warm"]
    print(f"\nmedian over rounds 2..{args.rounds - 1}: trivial Flower app round {floor_s:.2f}s (the engine's floor); "
          f"NEARL cold round {cold_wall:.2f}s, overhead {overhead:.2f}s; NEARL warm round {warm_wall:.2f}s, "
          f"overhead {warm_overhead:.2f}s")
    print("the overhead includes Flower's message polling (SuperNode and ServerApp) and, cold, a fresh "
          "flwr-clientapp process per message with its imports; site compute is what the sites report as "
          "train_seconds (warm: the backbone is already built)")
    print(f"a fresh interpreter importing client.app (NEARL's ClientApp: torch, open_clip, ...) takes {imports:.2f}s "
          f"now (median of 2; load average {load_average()}); every train message pays it at every site")
    if sim:
        for n in sim:
            n["overhead"] = n["wall"] - n["slowest"]
        print(f"\nSimulation Engine, same sites and rounds (Ray actors; no process per message):")
        print(f"{'round':>5}  {'wall (s)':>9}  {'slowest site (s)':>16}  {'overhead (s)':>12}")
        for n in sim:
            print(f"{n['round']:>5}  {n['wall']:>9.2f}  {n['slowest']:>16.2f}  {n['overhead']:>12.2f}")
        sim_overhead = statistics.median(n["overhead"] for n in sim[middle])
        sim_compute = statistics.median(n["slowest"] for n in sim[middle])
        print(f"median over rounds 2..{args.rounds - 1}: simulation overhead {sim_overhead:.2f}s "
              f"(slowest site compute {sim_compute:.2f}s)")
    result("federation_overhead_seconds", overhead, floor_s, TARGET_S, on="value", unit="s")  # cold, as before
    # warm: its overhead per round against the trivial app's round (all overhead: its sites compute nothing),
    # and against the cold overhead of the same run
    result("federation_overhead_warm_vs_trivial", warm_overhead, floor_s, WARM_VS_TRIVIAL_TARGET, on="ratio", unit="s")
    result("federation_overhead_warm_seconds", warm_overhead, overhead, WARM_TARGET_S, on="value", unit="s")
    if sim:  # baseline: the slowest site's compute, so the ratio is the overhead relative to the work
        result("federation_overhead_simulation_seconds", sim_overhead, sim_compute, TARGET_S, on="value", unit="s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
