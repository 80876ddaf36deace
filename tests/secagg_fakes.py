"""An in-process federation for the secure-aggregation tests: sites answer through the product's handlers.

:class:`InProcessGrid` plays the SuperLink: every message it is given is answered at once
by the addressed site's own handlers (:func:`client.secagg.stage_reply` for
``train.secagg`` messages, :func:`client.task.answer` with :func:`client.secagg.masking`
for the train instruction), each site keeping its own ``Context`` between messages, as a
SuperNode does.  Training is replaced by a known update (:class:`FakeModel`), so the
tests know every site's update exactly.  ``drop`` makes chosen sites vanish at a stage
(no reply: a dead node); every reply the server receives is kept in ``received`` (the spy).

A malicious coordinator is the same grid with ``tamper``: it sees and may rewrite every
message before the site gets it (what the site saw is in ``sent``).  :func:`with_roster`
gives sites SuperNode keys and a consortium roster (signed rounds); each site's round state
after every message it answered is in ``history`` (tests/secagg_spy.py reads it).
"""

from __future__ import annotations

import datetime
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from client.binding import SiteBinding
from client.secagg import STATE, masking, stage_reply
from client.task import Outcome, answer
from nearl_protocol import keys
from nearl_protocol.arrays import decode_array
from nearl_protocol.flat import FlatLayout
from nearl_protocol.messages import instruction_config
from nearl_protocol.roster import make_roster
from server.secagg import SecAggSettings
from server.strategy import make_strategy
from tests.fed_helpers import RoundRecorder

SCHEMA = {"adapters.a": ((3, 4), "float32"), "adapters.b": ((5,), "float32")}
LAYOUT = FlatLayout.of(SCHEMA)
_ids = itertools.count(1)


class FakeModel:
    """What :func:`client.secagg.masked_reply` reads of a trained model: its adapter tensors and its config
    (which groups stay local: none here)."""

    def __init__(self, flat: np.ndarray):
        from nearl_core.config import NearlConfig

        self.tensors = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in LAYOUT.split(flat).items()}
        self.cfg = NearlConfig()

    def adapter_parameters(self) -> dict[str, torch.Tensor]:
        return self.tensors


@dataclass
class Site:
    node: int
    name: str
    delta: np.ndarray  # what its local training adds to the global adapters
    examples: int
    state_dir: Path
    declines: bool = False
    auth_key: Path | None = None  # with_roster: its SuperNode private key
    roster: Path | None = None
    min_sites: int | None = None
    context: Context = field(init=False)

    def __post_init__(self) -> None:
        self.context = Context(run_id=1, node_id=self.node, node_config={}, state=RecordDict(), run_config={})

    @property
    def binding(self) -> SiteBinding:
        return SiteBinding(self.name, self.state_dir, state_dir=self.state_dir, coordinator="in-process",
                           roster=self.roster, auth_key=self.auth_key, min_secure_sites=self.min_sites)

    def refusals(self) -> list[str]:
        """The ``refused`` reasons on this site's audit trail."""
        path = self.binding.audit_file()
        lines = [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []
        return [x["refused"] for x in lines if x["refused"]]

    def train(self, msg: Message, instruction: Any, binding: SiteBinding, log) -> Outcome:  # noqa: ARG002
        start = decode_array(msg.content[keys.ARRAYS][keys.ADAPTERS]).astype(np.float32)
        metrics = {keys.NUM_EXAMPLES: self.examples, keys.TRAIN_LOSS: 0.5, keys.TRAIN_ACCURACY: 0.75}
        if self.declines:
            return Outcome({**metrics, keys.DP_DECLINED: 1.0})
        return Outcome(metrics, FakeModel((start + self.delta).astype(np.float32)))


class InProcessGrid:
    """The Grid the strategy sees; ``drop``: stage -> nodes that give no reply at that stage; ``tamper``: a
    malicious coordinator's rewrite of each message (None: withheld) before the addressed site gets it."""

    def __init__(self, sites: list[Site], drop: dict[str, set[int]] | None = None,
                 tamper: Callable[["InProcessGrid", Message], Message | None] | None = None):
        self.sites = {s.node: s for s in sites}
        self.drop = drop or {}
        self.tamper = tamper
        self.received: list[Message] = []
        self.sent: list[Message] = []
        self.secrets: dict[int, dict] = {}  # node -> its round state just before it answered unmask (for spies)
        self.history: dict[int, list[dict]] = {}  # node -> its round state after every message it answered

    def get_node_ids(self) -> list[int]:
        return sorted(self.sites)

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:  # noqa: ARG002
        replies = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = f"msg-{next(_ids)}"
            m = self.tamper(self, m) if self.tamper else m
            if m is None:
                continue
            self.sent.append(m)
            site = self.sites[m.metadata.dst_node_id]
            if site.node in self.drop.get(stage_of(m), set()):
                continue
            if stage_of(m) == "unmask" and STATE in site.context.state.config_records:
                self.secrets[site.node] = dict(site.context.state.config_records[STATE])
            if m.metadata.message_type == keys.SECAGG_MESSAGE_TYPE:
                reply = stage_reply(m, site.context, lambda *a, **k: None, binding=site.binding)
            else:
                reply = answer(m, site.binding, site.train, lambda *a, **k: None, masking(m, site.context))
            reply.metadata.__dict__["_src_node_id"] = site.node
            replies.append(reply)
            if STATE in site.context.state.config_records:
                self.history.setdefault(site.node, []).append(dict(site.context.state.config_records[STATE]))
        self.received.extend(replies)
        return replies


def stage_of(m: Message) -> str:
    rec = m.content.config_records.get(keys.SECAGG)
    return str(rec[keys.SECAGG_STAGE]) if rec is not None else "train"


def make_ca(folder: Path) -> Path:
    """A self-signed CA certificate (the federation's ca.crt) in ``folder``."""
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nearl test CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ca.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return folder / "ca.crt"


def site_key(folder: Path, name: str) -> tuple[Path, Path]:
    """A site's SuperNode key pair as deploy/make-site-key.sh writes it: (private key, NAME.pub), OpenSSH."""
    key = ec.generate_private_key(ec.SECP384R1())
    folder.mkdir(parents=True, exist_ok=True)
    private, public = folder / name, folder / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    public.write_bytes(line + f" nearl-site-{name}\n".encode())
    return private, public


def with_roster(tmp: Path, sites: list[Site], *, min_sites: int | None = None, ca: Path | None = None,
                also: tuple[Path, ...] = ()) -> Path:
    """Give each site a SuperNode key and pin one roster of them (plus the ``also`` public keys); the roster."""
    ca = ca or make_ca(tmp / "certs")
    pubs = []
    for site in sites:
        site.auth_key, pub = site_key(tmp / "keys", site.name)
        pubs.append(pub)
    roster = tmp / "roster.json"
    roster.write_text(json.dumps(make_roster(ca, pubs + list(also)), indent=2, sort_keys=True))
    for site in sites:
        site.roster, site.min_sites = roster, min_sites
    return roster


def make_sites(tmp: Path, n: int, *, seed: int = 0, scale: float = 0.01) -> list[Site]:
    rng = np.random.default_rng(seed)
    return [Site(node=100 + i, name=f"site{i + 1}", delta=(rng.standard_normal(LAYOUT.size) * scale).astype(np.float32),
                 examples=int(rng.integers(10, 500)), state_dir=tmp / f"site{i + 1}") for i in range(n)]


def initial_record(value: float = 0.1) -> ArrayRecord:
    return ArrayRecord({k: Array(np.full(shape, value, dtype=dtype)) for k, (shape, dtype) in SCHEMA.items()})


def run_round(sites: list[Site], *, drop: dict[str, set[int]] | None = None, strategy: str = "fedavg",
              secure: SecAggSettings | None = SecAggSettings(clip=0.1, threshold=0.5), grid: InProcessGrid | None = None,
              server_round: int = 1, start: ArrayRecord | None = None):
    """One round through the strategy's own hooks; (new arrays or None, the round report, the grid, the strategy)."""
    recorder = RoundRecorder()
    grid = grid or InProcessGrid(sites, drop)
    s = make_strategy(strategy, schema=SCHEMA, min_nodes=len(sites), listener=recorder, wait_timeout=1,
                      options={"outlier-factor": 0.0}, secure=secure)
    config = instruction_config(nearl_config={}, transport="float32", backbone="in-process", local_epochs=1, total_rounds=1)
    start = start or initial_record()
    messages = list(s.configure_train(server_round, start, config, grid))
    replies = grid.send_and_receive(messages)
    arrays, _ = s.aggregate_train(server_round, replies)
    list(s.configure_evaluate(server_round, arrays or start, ConfigRecord(), grid))
    s.aggregate_evaluate(server_round, [])
    return arrays, recorder.rounds[-1], grid, s


def flat_of(arrays: ArrayRecord) -> np.ndarray:
    return LAYOUT.pack({k: arrays[k].numpy() for k in SCHEMA}).astype(np.float64)


def sent_update(site: Site, start: ArrayRecord | None = None) -> np.ndarray:
    """The update a site computes (float64): its float32 adapters minus the global ones it received."""
    g = flat_of(start or initial_record())
    return (g.astype(np.float32) + site.delta).astype(np.float32).astype(np.float64) - g


def plain_mean(sites: list[Site], start: ArrayRecord | None = None) -> np.ndarray:
    """The global adapters plain FedAvg would produce from these sites' updates (float64)."""
    w = np.array([s.examples for s in sites], dtype=np.float64)
    return flat_of(start or initial_record()) + sum(wi * sent_update(s, start) for wi, s in zip(w, sites)) / w.sum()
