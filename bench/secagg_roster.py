"""Bench: what the consortium roster adds to a secure round: signatures, their bytes, the consistency exchange.

    python bench/secagg_roster.py                         # demo model, 3 and 10 sites, 2 rounds
    python bench/secagg_roster.py --sites 3,10 --rounds 2 --train-per-site 16

Engine: bench/secagg.py's in-process federation (the product's ServerApp code and the
sites' own handlers on the synthetic demo data).  For each number of sites the same
secure federation runs twice in one process: unsigned (no roster: today's four exchanges)
and signed (every site and the coordinator pin a roster: signed key advertisements, the
consistency exchange, signed survivor sets).  Per round: bytes sent + received (the
ServerApp's progress events) and the time spent inside secure aggregation (the server's
stages with the sites' in-process answers, and the sites' masking).  The signed minus the
unsigned run is what the roster costs.  Because that time difference is small against a
loaded shared CPU, the script also times ECDSA P-384 signing and verification alone and
multiplies by the operations a round needs (each site signs twice and verifies n
advertisements and up to n survivor-set signatures; the coordinator with the roster
verifies n of each).  On a deployment the extra exchange also pays one more message
round trip (the SuperNode's poll: about 4 s per exchange on loopback, docs/security.md).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import header, result  # noqa: E402


def consortium(folder: Path, sites: int) -> Path:
    """A CA, one SuperNode key per site (``folder/siteK``) and the roster of them; the roster's path."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from nearl_protocol.roster import make_roster

    folder.mkdir(parents=True, exist_ok=True)
    ca_key, now = ec.generate_private_key(ec.SECP384R1()), datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench CA")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(ca_key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(ca_key, hashes.SHA256()))
    (folder / "ca.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pubs = []
    for i in range(1, sites + 1):
        key = ec.generate_private_key(ec.SECP384R1())
        (folder / f"site{i}").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                            serialization.PrivateFormat.OpenSSH,
                                                            serialization.NoEncryption()))
        pubs.append(folder / f"site{i}.pub")
        pubs[-1].write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                           serialization.PublicFormat.OpenSSH))
    import json

    (folder / "roster.json").write_text(json.dumps(make_roster(folder / "ca.crt", pubs), sort_keys=True))
    return folder / "roster.json"


def signature_seconds(repeats: int = 200) -> tuple[float, float]:
    """Median seconds of one ECDSA P-384 signature and one verification over an advertisement-sized message."""
    from cryptography.hazmat.primitives.asymmetric import ec

    from nearl_protocol import signing

    key, data = ec.generate_private_key(ec.SECP384R1()), bytes(600)
    sig = signing.sign(key, data)
    sign_t, verify_t = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        signing.sign(key, data)
        t1 = time.perf_counter()
        signing.verifies(key.public_key(), sig, data)
        sign_t.append(t1 - t0)
        verify_t.append(time.perf_counter() - t1)
    return statistics.median(sign_t), statistics.median(verify_t)


def compare(n: int, rounds: int, train_per_site: int, tmp: Path) -> dict:
    """The unsigned and the signed secure federation of ``n`` demo sites, run one after the other."""
    from bench.secagg import federate
    from nearl_core.workflows import demo_data

    data = tmp / f"data-{n}"
    demo_data(data, n, train_per_site=train_per_site)
    roster = consortium(tmp / f"keys-{n}", n)
    unsigned = federate(data, tmp / f"unsigned-{n}", n, rounds, True, None)
    signed = federate(data, tmp / f"signed-{n}", n, rounds, True, None, roster=roster)
    return {"unsigned": unsigned, "signed": signed}


def report(n: int, runs: dict, rounds: int, sign_s: float, verify_s: float) -> None:
    unsigned, signed = runs["unsigned"], runs["signed"]
    for name, run in runs.items():
        print(f"# {n} sites, {name}: bytes per round {run['bytes']}, secure-aggregation seconds "
              f"{run['secagg_seconds']:.3f} over {rounds} rounds, not applied {[x for x in run['not_applied'] if x]}")
    diff = max(float(np.max(np.abs(np.asarray(signed["adapters"][k], np.float64)
                                   - np.asarray(unsigned["adapters"][k], np.float64)))) for k in unsigned["adapters"])
    print(f"# {n} sites: largest |signed - unsigned| over the final adapters: {diff:.3g}")
    crypto = n * (2 * sign_s + 2 * n * verify_s) + 2 * n * verify_s  # all sites one after the other + coordinator
    print(f"# {n} sites: ECDSA P-384 sign {sign_s * 1e3:.2f} ms, verify {verify_s * 1e3:.2f} ms; per round "
          f"{2 * n} signatures and {2 * n * n + 2 * n} verifications = {crypto:.3f} s of CPU in all, "
          f"{2 * sign_s + 2 * n * verify_s:.3f} s at each site")
    result(f"secagg_roster_round_bytes_{n}sites", statistics.median(signed["bytes"]),
           statistics.median(unsigned["bytes"]), None, unit="bytes")
    result(f"secagg_roster_seconds_{n}sites", signed["secagg_seconds"] / rounds, unsigned["secagg_seconds"] / rounds,
           None, unit="s")
    result(f"secagg_roster_signature_seconds_{n}sites", crypto, unsigned["secagg_seconds"] / rounds, None, unit="s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sites", default="3,10", help="comma-separated numbers of sites (default 3,10)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--train-per-site", type=int, default=16)
    args = p.parse_args(argv)
    header("what the roster adds to a secure round (in-process grid, demo model)")
    sign_s, verify_s = signature_seconds()
    with tempfile.TemporaryDirectory(prefix="nearl-bench-roster-") as tmp:
        from bench.secagg import federate
        from nearl_core.workflows import demo_data

        demo_data(Path(tmp) / "warm", 2, train_per_site=8)
        federate(Path(tmp) / "warm", Path(tmp) / "warm-up", 2, 1, False, None)  # builds and caches the backbone
        for n in (int(x) for x in args.sites.split(",")):
            report(n, compare(n, args.rounds, args.train_per_site, Path(tmp)), args.rounds, sign_s, verify_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
