"""The site's side of secure aggregation: one state machine per round, its secrets kept at the site.

:func:`stage_reply` answers the ``train.secagg`` messages (setup, share-keys, unmask);
:func:`masking` turns the round's train instruction into a masked reply (collect).  The
protocol and its record layouts live in :mod:`nearl_protocol.secagg`.

The round's secrets (two ECDH private keys, the mask seed, the shares other sites sent)
are kept in the node's ``Context.state`` between messages: Flower's per-node state, which
stays on the site (in the warm site worker's task context, the SuperNode's memory, or
the simulation's driver process), is never part of a reply and is never sent to the
coordinator.  Plain process memory would not do: a simulation runs a virtual site's
messages on whichever actor is free.  The secrets are wiped once the site has answered
the unmask stage, and a site answers that stage once per round, so it never hands out
both the seed share and the key share of the same participant.  A refusal at any stage
wipes them too: the site abandons the round rather than answer a second, different request.

A site that pins a roster (``nearl-client --roster``) signs its keys and its view of the
survivor set and checks its peers' before it uses a key or reveals a share
(:mod:`client.secagg_auth`); without one it trusts the coordinator's list of peers.

Every reply passes the egress gate (:func:`client.egress.check_secagg_reply` /
:func:`client.egress.check_masked_reply`) and is on the audit trail before it leaves.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common.secure_aggregation.crypto.shamir import create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt
from flwr.common.secure_aggregation.secaggplus_utils import (share_keys_plaintext_concat,
                                                             share_keys_plaintext_separate)
from flwr.supercore.primitives.asymmetric import generate_key_pairs, private_key_to_bytes, public_key_to_bytes

from client import audit
from client import secagg_auth as auth
from client.binding import SiteBinding, site_binding
from client.egress import check_masked_reply, check_reply_size, check_secagg_reply, pack_outgoing
from nearl_core.errors import NearlError
from nearl_protocol import keys
from nearl_protocol import secagg as sa
from nearl_protocol.arrays import decode_array
from nearl_protocol.messages import refusal

STATE = "nearl-secagg"  # Context.state record of the round in progress


# -- the state between stages --------------------------------------------------------------------------------
def _load(context: Context, server_round: int, stage: str) -> dict[str, Any]:
    """This round's state, which must have reached ``stage`` (and no later one); otherwise the one-line reason."""
    rec = context.state.config_records.get(STATE)
    state = {k: (list(v) if isinstance(v, list) else v) for k, v in rec.items()} if rec is not None else {}
    if state.get("round") != server_round:
        raise sa.SecAggError(f"secure aggregation round {server_round}: this site holds no keys for it "
                             "(it missed the key setup); it sits this round out")
    if state.get("stage") != stage:
        raise sa.SecAggError(f"secure aggregation round {server_round}: this site is past stage "
                             f"{state.get('stage')!r}, the message needs stage {stage!r} done last; refusing")
    return state


def _save(context: Context, state: dict[str, Any]) -> None:
    context.state.config_records[STATE] = ConfigRecord(state)


def _abandon(context: Context, server_round: int | None) -> None:
    """Wipe this round's secrets after a refusal: nothing more of the round is answered (another round's stay)."""
    rec = context.state.config_records.get(STATE)
    if server_round is not None and rec is not None and rec.get("round") == server_round:
        _save(context, {"round": server_round, "stage": "abandoned"})


def _params(state: dict[str, Any]) -> sa.Params:
    return sa.Params.from_config(state)


# -- stages -------------------------------------------------------------------------------------------------
def _setup(context: Context, record: Any, binding: SiteBinding, run_id: int) -> dict[str, Any]:
    """New key pairs for this round: one for the pairwise masks, one for encrypting shares (signed with a roster)."""
    params, site_auth = sa.Params.from_config(record), auth.site_auth(binding)
    me = int(record[keys.SECAGG_INDEX])
    if not 1 <= me <= params.sites:
        raise sa.SecAggError(f"participant number {me} is outside 1..{params.sites}")
    if site_auth is not None:
        auth.check_round_size(site_auth, params.sites)
    sk1, pk1 = generate_key_pairs()
    sk2, pk2 = generate_key_pairs()
    state = {**params.to_config(), "round": int(record[keys.SERVER_ROUND]), "stage": sa.SETUP, "index": me,
             "run": run_id, "sk1": private_key_to_bytes(sk1), "sk2": private_key_to_bytes(sk2),
             "pk1": public_key_to_bytes(pk1), "pk2": public_key_to_bytes(pk2)}
    _save(context, state)
    return {keys.SECAGG_PK1: state["pk1"], keys.SECAGG_PK2: state["pk2"],
            **auth.advertise(site_auth, binding.site, run_id=run_id, server_round=state["round"], index=me,
                             pk1=state["pk1"], pk2=state["pk2"])}


def _share_keys(context: Context, record: Any, binding: SiteBinding, run_id: int) -> dict[str, Any]:
    """Shamir-share the mask seed and the mask private key; one encrypted share pair per other participant.

    With a roster, every advertisement is checked first: no peer key is used before that.
    """
    state = _load(context, int(record[keys.SERVER_ROUND]), sa.SETUP)
    params, me, site_auth = _params(state), state["index"], auth.site_auth(binding)
    who, pk1s, pk2s = record[keys.SECAGG_PARTICIPANTS], record[keys.SECAGG_PK1], record[keys.SECAGG_PK2]
    if not len(who) == len(pk1s) == len(pk2s) or len(set(who)) != len(who):
        raise sa.SecAggError("share-keys: the participant and key lists differ in length or repeat a participant")
    if not set(who) <= set(range(1, params.sites + 1)) or len(who) < params.threshold:
        raise sa.SecAggError(f"share-keys: {len(who)} participants, threshold {params.threshold} of {params.sites}")
    if len(set(pk1s) | set(pk2s)) != 2 * len(who):
        raise sa.SecAggError("share-keys: two participants share a public key; refusing")
    keys_of = {j: (a, b) for j, a, b in zip(who, pk1s, pk2s)}
    if keys_of.get(me) != (state["pk1"], state["pk2"]):
        raise sa.SecAggError("share-keys: this site's own public keys are missing or altered; refusing")
    names = list(record[keys.SECAGG_NAMES])
    if site_auth is not None:
        names = auth.check_peers(site_auth, record, run_id=state["run"], server_round=state["round"], me=me)
    seed = os.urandom(32)
    seed_shares = create_shares(seed, params.threshold, params.sites)
    key_shares = create_shares(state["sk1"], params.threshold, params.sites)
    dests, texts = [], []
    for j in who:
        if j != me:
            plain = share_keys_plaintext_concat(me, j, seed_shares[j - 1], key_shares[j - 1])
            dests.append(j)
            texts.append(encrypt(sa.share_key(state["sk2"], keys_of[j][1]), plain))
    state.update(stage=sa.SHARE_KEYS, seed=seed, peers=list(who), peer_pk1=list(pk1s), peer_pk2=list(pk2s),
                 held=[me], held_seed=[seed_shares[me - 1]], held_key=[key_shares[me - 1]], names=names,
                 signed=site_auth is not None)
    _save(context, state)
    return {keys.SECAGG_PARTICIPANTS: dests, keys.SECAGG_CIPHERTEXTS: texts}


def _receive_shares(state: dict[str, Any], record: Any) -> list[int]:
    """Decrypt the share pairs addressed to this site; their senders are its mask partners."""
    me, peers = state["index"], state["peers"]
    sources, texts = record[keys.SECAGG_PARTICIPANTS], record[keys.SECAGG_CIPHERTEXTS]
    if len(sources) != len(texts) or len(set(sources)) != len(sources) or me in sources:
        raise sa.SecAggError("collect: the share list is malformed (lengths, repeats or this site's own)")
    if not set(sources) <= set(peers) or len(sources) + 1 < _params(state).threshold:
        raise sa.SecAggError(f"collect: shares from {len(sources)} known participants; the threshold is "
                             f"{_params(state).threshold}")
    for src, text in zip(sources, texts):
        pk2 = state["peer_pk2"][peers.index(src)]
        got_src, dst, seed_share, key_share = share_keys_plaintext_separate(decrypt(sa.share_key(state["sk2"], pk2),
                                                                                     text))
        if (got_src, dst) != (src, me):
            raise sa.SecAggError(f"collect: a share pair from {got_src} to {dst} arrived as {src} to {me}")
        state["held"].append(src)
        state["held_seed"].append(seed_share)
        state["held_key"].append(key_share)
    return list(sources)


def _check_survivor_set(state: dict[str, Any], record: Any, stage: str) -> tuple[list[int], list[int]]:
    """(active, dead) of a consistency or unmask request, when they split this site's mask partners."""
    params, me = _params(state), state["index"]
    active, dead = list(record[keys.SECAGG_ACTIVE]), list(record[keys.SECAGG_DEAD])
    if len(set(active)) != len(active) or len(set(dead)) != len(dead) or set(active) & set(dead):
        raise sa.SecAggError(f"{stage}: a participant is listed twice or as both active and dropped; refusing")
    if set(active) | set(dead) != set(state["partners"]) | {me} or me not in active:
        raise sa.SecAggError(f"{stage}: the active and dropped lists do not match this site's mask partners")
    if len(active) < params.threshold:
        raise sa.SecAggError(f"{stage}: {len(active)} active participants, below the threshold {params.threshold}")
    return active, dead


def _consistency(context: Context, record: Any, binding: SiteBinding, run_id: int) -> dict[str, Any]:  # noqa: ARG001
    """Sign the survivor set as told (a signed round only): the coordinator must show t such signatures to unmask."""
    state = _load(context, int(record[keys.SERVER_ROUND]), sa.COLLECT)
    site_auth = auth.site_auth(binding)
    if not state.get("signed") or site_auth is None:
        raise sa.SecAggError("consistency: this round's keys were not signed (this site pins no roster); refusing")
    active, dead = _check_survivor_set(state, record, sa.CONSISTENCY)
    signature = auth.sign_survivors(site_auth, state, active, dead)
    state.update(stage=sa.CONSISTENCY, signed_active=active, signed_dead=dead)
    _save(context, state)
    return {keys.SECAGG_SIGNATURE: signature}


def _unmask(context: Context, record: Any, binding: SiteBinding, run_id: int) -> dict[str, Any]:  # noqa: ARG001
    """Seed shares of the participants the server sums, key shares of those that dropped; then forget all.

    In a signed round only after the consistency stage, against t valid signatures over the set this site signed.
    """
    server_round = int(record[keys.SERVER_ROUND])
    rec = context.state.config_records.get(STATE)
    signed = bool(rec.get("signed")) if rec is not None and rec.get("round") == server_round else False
    state = _load(context, server_round, sa.CONSISTENCY if signed else sa.COLLECT)
    active, dead = _check_survivor_set(state, record, sa.UNMASK)
    if signed:
        auth.check_survivor_signatures(auth.site_auth(binding), state, record)
    elif record[keys.SECAGG_SIGNERS] or record[keys.SECAGG_SIGNATURES]:
        raise sa.SecAggError("unmask: survivor-set signatures in a round whose keys were not signed; refusing")
    held = state["held"]
    shares = ([state["held_seed"][held.index(j)] for j in active] + [state["held_key"][held.index(j)] for j in dead])
    _save(context, {"round": state["round"], "stage": sa.UNMASK})  # secrets wiped: unmask is answered once
    return {keys.SECAGG_PARTICIPANTS: list(active) + list(dead), keys.SECAGG_SHARES: shares}


STAGE_HANDLERS: dict[str, Callable[[Context, Any, SiteBinding, int], dict[str, Any]]] = {
    sa.SETUP: _setup, sa.SHARE_KEYS: _share_keys, sa.CONSISTENCY: _consistency, sa.UNMASK: _unmask}


def stage_reply(msg: Message, context: Context, log=print, *, binding: SiteBinding | None = None) -> Message:
    """Answer a ``train.secagg`` message (setup, share-keys, consistency or unmask); a refusal carries only the
    reason, is on the audit trail, and ends this site's part in the round."""
    binding = binding or site_binding(context.node_config)
    server_round, stage = None, "?"
    try:
        record = msg.content.config_records.get(keys.SECAGG) if msg.has_content() else None
        if record is None:
            raise sa.SecAggError("a secure-aggregation message without its record; server and site versions differ")
        stage = sa.stage_of(record)
        if stage not in STAGE_HANDLERS:
            raise sa.SecAggError(f"stage {stage!r} does not come as a {keys.SECAGG_MESSAGE_TYPE} message")
        sa.check_record(record, sa.INSTRUCTION[stage], f"{stage} instruction")
        server_round = int(record[keys.SERVER_ROUND])
        out = STAGE_HANDLERS[stage](context, record, binding, int(msg.metadata.run_id))
        reply = Message(RecordDict({keys.SECAGG: ConfigRecord(out),
                                    keys.SITE: ConfigRecord({keys.SITE_NAME: binding.site})}), reply_to=msg)
        check_secagg_reply(reply.content, stage)
        check_reply_size(reply.content, binding.max_reply_bytes)
    except (NearlError, ValueError, KeyError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        log(f"[{binding.site}] round {server_round or '?'} secure aggregation {stage} refused: {reason}", flush=True)
        reply = refusal(msg, reason, site=binding.site)
        _abandon(context, server_round)
    audit.append(binding.audit_file(), audit.audit_line(msg, reply, site=binding.site, coordinator=binding.coordinator,
                                                        server_round=server_round, eps_before=None, eps_after=None))
    return reply


# -- collect: the train reply, masked -----------------------------------------------------------------------
def masking(msg: Message, context: Context) -> Callable[..., Message] | None:
    """The reply builder :func:`client.task.answer` uses for a secure round's train instruction, else None."""
    if not msg.has_content() or keys.SECAGG not in msg.content.config_records:
        return None
    return functools.partial(masked_reply, context=context)


def _update(msg: Message, outcome: Any) -> tuple[np.ndarray, int]:
    """The site's plaintext update (its adapters minus the global ones, float64) and its example count.

    The plaintext passes the egress schema check before it is masked; a site that declined
    the round (privacy budget) sends a zero update of weight 0, so nobody learns it declined
    from the masks.
    """
    from nearl_core.adapter_io import shared_schema, shared_state
    from nearl_core.transport import widen_flat

    received = decode_array(msg.content[keys.ARRAYS][keys.ADAPTERS])
    if outcome.model is None:
        return np.zeros(received.shape[0]), 0
    schema = shared_schema(outcome.model)  # the federated tensors: local groups never leave, masked or not
    local = pack_outgoing({k: v.detach().cpu().numpy() for k, v in shared_state(outcome.model).items()}, schema)
    start = np.asarray(widen_flat(received, outcome.transport), dtype=np.float64)
    if start.shape != local.shape:
        raise sa.SecAggError(f"the global adapters hold {start.shape[0]} values, this site's {local.shape[0]}")
    return local.astype(np.float64) - start, int(outcome.metrics.get(keys.NUM_EXAMPLES, 0))


def masked_reply(msg: Message, binding: SiteBinding, outcome: Any, *, context: Context) -> Message:
    """The train reply of a secure round: the weighted, quantized update plus every mask, mod 2^32."""
    record = msg.content.config_records[keys.SECAGG]
    sa.check_record(record, sa.INSTRUCTION[sa.COLLECT], "collect instruction")
    if sa.stage_of(record) != sa.COLLECT:
        raise sa.SecAggError("a train instruction of a secure round must be the collect stage")
    state = _load(context, int(record[keys.SERVER_ROUND]), sa.SHARE_KEYS)
    try:
        reply, partners = _masked(msg, binding, outcome, state, record)
    except (NearlError, ValueError, KeyError):
        _abandon(context, state["round"])
        raise
    state.update(stage=sa.COLLECT, partners=partners)
    _save(context, state)
    return reply


def _masked(msg: Message, binding: SiteBinding, outcome: Any, state: dict[str, Any], record: Any
            ) -> tuple[Message, list[int]]:
    """The masked reply and this site's mask partners (the senders of the share pairs it received)."""
    params, me, r = _params(state), state["index"], state["round"]
    partners = _receive_shares(state, record)
    update, examples = _update(msg, outcome)
    masked = sa.add(sa.encode(update, examples, params), sa.self_mask(state["seed"], update.size + sa.EXTRA_SLOTS, r))
    for j in partners:
        secret = sa.pair_secret(state["sk1"], state["peer_pk1"][state["peers"].index(j)])
        masked = sa.add(masked, sa.pair_mask(secret, me, j, masked.size, r))
    metrics = {k: v for k, v in outcome.metrics.items() if k != keys.NUM_EXAMPLES}  # the weight travels masked
    reply = Message(RecordDict({keys.ARRAYS: ArrayRecord({keys.MASKED: Array(masked)}),
                                keys.METRICS: MetricRecord(metrics),
                                keys.SITE: ConfigRecord({keys.SITE_NAME: binding.site})}), reply_to=msg)
    check_masked_reply(reply.content, update.size + sa.EXTRA_SLOTS)
    return reply, partners
