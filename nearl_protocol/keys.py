"""Every key on the wire, named once.

One convention on the wire: kebab-case, as Flower's own keys (``num-examples``,
``server-round``).  MLflow keeps the snake_case names users' dashboards read
(``train_loss``, ``eval_accuracy``, ``<site>/dp_steps``): :func:`mlflow_name` derives them
from a site's keys, and the names the server reads or adds itself are named below, once.
"""

from __future__ import annotations

# -- records of a message -------------------------------------------------------------------------
ARRAYS = "arrays"  # ArrayRecord: the adapters (global in an instruction, the site's in a reply) ...
ADAPTERS = "adapters"  # ... as its one flat array, every tensor in the agreed schema's order (nearl_protocol.flat)
CONFIG = "config"  # ConfigRecord of an instruction
METRICS = "metrics"  # MetricRecord of a reply: scalars only
SITE = "site"  # ConfigRecord of a reply: the site's self-reported name (never trusted for attribution)
SITE_NAME = "name"

# -- instruction config (server -> site) ----------------------------------------------------------
NEARL_CONFIG = "nearl-config"  # the resolved NEARL config as JSON: every site builds the same model
SERVER_ROUND = "server-round"  # set by Flower's strategies
LOCAL_EPOCHS = "local-epochs"
TOTAL_ROUNDS = "total-rounds"
TRANSPORT = "transport-dtype"
EVALUATE_FIRST = "evaluate-first"
FINAL_EVALUATION = "final-evaluation"  # an evaluate message of the adapters the federation keeps: test split,
# then personalization; any other evaluate message is federated validation (val split only)
PROXIMAL_MU = "proximal-mu"  # set by Flower's FedProx
BACKBONE = "backbone-fingerprint"  # the coordinator's frozen backbone; a site with another one refuses
ADAPTER_LAYOUT = "adapter-layout"  # digest of the flat adapters' layout (names, shapes, dtype, order)
NODE_REFUSED = "node-refused"  # why the server refuses this node's replies (e.g. a duplicate site name)

# -- reply metrics (site -> server) ---------------------------------------------------------------
NUM_EXAMPLES = "num-examples"  # Flower's weighting key
TRAIN_LOSS = "train-loss"
TRAIN_ACCURACY = "train-accuracy"
TRAIN_SECONDS = "train-seconds"
EVAL_PREFIX = "eval-"  # metrics of the incoming global adapters on the site's val split
TEST_PREFIX = "test-"  # ... and on its test split (evaluate message)
PERSONAL_PREFIX = "personal-"  # ... and of the site's personalized adapters on its test split (last evaluate)
EVAL_EXAMPLES = "eval-examples"
TEST_EXAMPLES = "test-examples"
PERSONAL_EXAMPLES = "personal-examples"
EPSILON = "epsilon"  # the site's DP ledger (nearl_core.privacy.PrivacyState.report)
DP_STEPS = "dp-steps"
DP_SAMPLE_RATE = "dp-sample-rate"
DP_NOISE_MULTIPLIER = "dp-noise-multiplier"
DP_DELTA = "dp-delta"
LEDGER = (EPSILON, DP_STEPS, DP_SAMPLE_RATE, DP_NOISE_MULTIPLIER, DP_DELTA)
DP_DECLINED = "dp-declined"  # 1: the round would pass the site's budget; no arrays in the reply
DP_MAX_EPSILON = "dp-max-epsilon"
DP_EPSILON_NEXT = "dp-epsilon-next"
COUNT_KEYS = (NUM_EXAMPLES, EVAL_EXAMPLES, TEST_EXAMPLES, PERSONAL_EXAMPLES)
WORKER_PID = "worker-pid"  # the process that answered (a warm site: its long-lived worker)
WORKER_BUILDS = "worker-builds"  # frozen backbones that process built since it started
WORKER_WARM = "worker-warm"  # 1: this message's backbone came from the process's cache, 0: it was built
WORKER = (WORKER_PID, WORKER_BUILDS, WORKER_WARM)  # per-site facts, never averaged over sites

# -- secure aggregation (nearl_protocol.secagg) --------------------------------------------------
SECAGG_MESSAGE_TYPE = "train.secagg"  # key setup, key sharing and unmasking (a ClientApp's @app.train("secagg"))
SECAGG = "secagg"  # ConfigRecord of every secure-aggregation message and stage reply
SECAGG_STAGE = "secagg-stage"  # setup, share-keys, collect (the train instruction), consistency, unmask
SECAGG_INDEX = "secagg-index"  # the site's participant number in this round (1..n), its Shamir share index
SECAGG_SITES = "secagg-sites"  # n: participants sampled for the round
SECAGG_THRESHOLD = "secagg-threshold"  # t: shares needed to reconstruct a secret (t > n / 2)
SECAGG_CLIP = "secagg-clip"  # per-coordinate clip range of an update before quantization
SECAGG_MAX_WEIGHT = "secagg-max-weight"  # the largest weight (example count) one site's update carries
SECAGG_EQUAL_WEIGHTS = "secagg-equal-weights"  # every update weighs 1 instead of its example count
SECAGG_PK1 = "secagg-pk1"  # public key for the pairwise masks (setup reply; list by participant in share-keys)
SECAGG_PK2 = "secagg-pk2"  # public key for encrypting shares (idem)
SECAGG_PARTICIPANTS = "secagg-participants"  # participant numbers the lists of a message refer to
SECAGG_CIPHERTEXTS = "secagg-ciphertexts"  # encrypted share pairs (share-keys reply, collect instruction)
SECAGG_ACTIVE = "secagg-active"  # unmask: participants whose masked update is summed (their seed shares)
SECAGG_DEAD = "secagg-dead"  # unmask: participants that dropped after sharing keys (their key shares)
SECAGG_SHARES = "secagg-shares"  # unmask reply: one share per participant of SECAGG_PARTICIPANTS
SECAGG_NAME = "secagg-name"  # setup reply: the site name it signs its keys under (nearl_protocol.signing)
SECAGG_KEY_ID = "secagg-key-id"  # setup reply: the roster fingerprint of the key that signed ("": unsigned)
SECAGG_SIGNATURE = "secagg-signature"  # setup reply: the key advertisement's; consistency reply: the survivor set's
SECAGG_NAMES = "secagg-names"  # share-keys: SECAGG_NAME by participant
SECAGG_KEY_IDS = "secagg-key-ids"  # share-keys: SECAGG_KEY_ID by participant
SECAGG_SIGNATURES = "secagg-signatures"  # share-keys: the advertisements'; unmask: the survivor set's, by signer
SECAGG_SIGNERS = "secagg-signers"  # unmask: the participants whose survivor-set signatures it carries
MASKED = "masked-update"  # the one array of a masked train reply: uint32, the adapters' length + 2

# -- MLflow metric names (the federation's run; dashboards read them, so they never change) ------
# What the sites report, as mlflow_name() calls it; per site each is also logged as <site>/<name>.
MLFLOW_TRAIN_EXAMPLES = "train_examples"  # mlflow_name(NUM_EXAMPLES): the weight of the train_* means
MLFLOW_TRAIN_LOSS = "train_loss"
MLFLOW_TRAIN_SECONDS = "train_seconds"
MLFLOW_EVAL_PREFIX = "eval_"  # the means of eval_* are weighted by eval_examples, test_* by test_examples, ...
MLFLOW_TEST_PREFIX = "test_"
MLFLOW_PERSONAL_PREFIX = "personal_"
MLFLOW_EVAL_EXAMPLES = "eval_examples"
MLFLOW_TEST_EXAMPLES = "test_examples"
MLFLOW_PERSONAL_EXAMPLES = "personal_examples"
MLFLOW_EVAL_LOSS = "eval_loss"
MLFLOW_EVAL_ACCURACY = "eval_accuracy"
MLFLOW_EVAL_BALANCED_ACCURACY = "eval_balanced_accuracy"
MLFLOW_EVAL_MACRO_F1 = "eval_macro_f1"
MLFLOW_EVAL_AUROC = "eval_auroc"
MLFLOW_EPSILON = "epsilon"
MLFLOW_DP_PREFIX = "dp_"  # a site's ledger facts (steps, sample rate, ...): never averaged over sites
MLFLOW_DP_EPSILON_NEXT = "dp_epsilon_next"
MLFLOW_DP_MAX_EPSILON = "dp_max_epsilon"
# What the server adds per round.
MLFLOW_EPSILON_MAX = "epsilon_max"  # the worst site epsilon
MLFLOW_SITES_WARM = "sites_warm"  # sites whose worker had the backbone cached
MLFLOW_ROUND_SECONDS = "round_seconds"
MLFLOW_BYTES_SENT = "bytes_sent"
MLFLOW_BYTES_RECEIVED = "bytes_received"
MLFLOW_SITES_ANSWERED = "sites_answered"
MLFLOW_SITES_MISSING = "sites_missing"
MLFLOW_SITES_REJECTED = "sites_rejected"
MLFLOW_SITES_DECLINED = "sites_declined"
MLFLOW_SITES_DUPLICATE = "sites_duplicate"
MLFLOW_ANSWERED = "answered"  # <site>/answered: 1 or 0
MLFLOW_SECAGG_CLIPPED = "secagg_clipped"
MLFLOW_SECAGG_ERROR_BOUND = "secagg_error_bound"
MLFLOW_SECAGG_DROPPED = "secagg_dropped"

# -- MLflow provenance of a registered model (the coordinator writes it, ``nearl-client verify`` reads it) --
MLFLOW_REGISTERED_MODEL = "nearl-adapters"  # every federation's final adapters are a version of it
PAYLOAD_TAG_PREFIX = "payload_sha256/"  # run tag payload_sha256/round_NNNN/<site>: the update aggregated


def payload_tag(server_round: int, site: str) -> str:
    """The run tag holding the sha256 of the update ``site`` sent in ``server_round`` (as its audit trail has it)."""
    return f"{PAYLOAD_TAG_PREFIX}round_{server_round:04d}/{site}"


def read_payload_tag(tag: str) -> tuple[int, str] | None:
    """(round, site) of a :func:`payload_tag`; None for any other tag."""
    rest = tag.removeprefix(PAYLOAD_TAG_PREFIX)
    head, _, site = rest.partition("/")
    if rest == tag or not head.startswith("round_") or not head[6:].isdigit() or not site:
        return None
    return int(head[6:]), site


def round_tag(server_round: int, what: str) -> str:
    """A round's run tag such as ``round_0003_not_applied`` (why its aggregate was not applied)."""
    return f"round_{server_round:04d}_{what}"

# -- error reasons a site sends instead of a reply ------------------------------------------------
BACKBONE_MISMATCH = "backbone mismatch"
SITE_POLICY = "site policy"  # the site's own policy refuses what the coordinator asks (client/policy.py)
WAITING_FOR_APPROVAL = "waiting for approval"  # the site's operator has not approved this run's config yet
REFUSED_BY_SITE = "refused by the site's operator"  # the operator refused the run (nearl-client refuse)
SITE_SAYS = (SITE_POLICY, WAITING_FOR_APPROVAL, REFUSED_BY_SITE)  # reasons that are the site's own say, not a fault


def wire_metric(prefix: str, name: str) -> str:
    """``('eval-', 'balanced_accuracy')`` -> ``eval-balanced-accuracy``; a class suffix is kept."""
    head, sep, tail = name.partition("/")
    return f"{prefix}{head.replace('_', '-')}{sep}{tail}"


def mlflow_name(key: str) -> str:
    """The MLflow name of a wire key: ``train-loss`` -> ``train_loss``, ``num-examples`` -> ``train_examples``."""
    if key == NUM_EXAMPLES:
        return MLFLOW_TRAIN_EXAMPLES
    head, sep, tail = key.partition("/")
    return f"{head.replace('-', '_')}{sep}{tail}"
