"""Every use of a non-public Flower interface by the NEARL site worker, in one place.

The site worker (:mod:`client.worker`) plays the part of Flower's SuperExec and of a
``flwr-clientapp`` process at once: it acquires ClientApp tasks from its SuperNode's
Runtime API, pulls each task's message, runs the site's *installed* handlers and pushes
the reply.  Flower has no public API for that, so this module wraps the pieces of
``flwr==1.42.*`` it uses (the same calls ``flwr-clientapp`` and ``flower-superexec`` make).
Nothing else in NEARL imports them.  The site's supervisor also relies on two things
Flower does not promise: the SuperNode's entry point as a function (:mod:`client.supernode`
runs it so that the process ends with its connection) and the log messages in which the
SuperNode reports its connection (:data:`SUPERNODE_LOG`).

:func:`check` imports every name listed in :data:`REQUIRED` and reports what is missing;
``tests/test_warm_site.py`` fails with that list when an upgraded Flower no
longer offers what the worker relies on (then pin back to 1.42 or port this module).
"""

from __future__ import annotations

import base64
import hashlib
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PINNED = "1.42"  # the Flower minor version this module was written against (pyproject pins flwr==1.42.*)

# module -> names this module uses from it
REQUIRED: dict[str, tuple[str, ...]] = {
    "flwr.supercore.runtime": ("RuntimeHttpClient",),
    "flwr.supercore.interceptors": ("RuntimeTokenHttpInterceptor", "RuntimeVersionHttpInterceptor",
                                    "SuperExecAuthHttpInterceptor"),
    "flwr.supercore.auth.superexec_secret": ("load_superexec_auth_secret",),
    "flwr.supercore.heartbeat": ("HeartbeatSender", "make_task_heartbeat_fn_http"),
    "flwr.supercore.constant": ("TaskType",),
    "flwr.common.constant": ("SubStatus", "ErrorCode"),
    "flwr.common.serde": ("message_from_proto", "message_to_proto", "context_to_proto"),
    "flwr.app.message": ("remove_content_from_message",),
    "flwr.proto.runtime_pb2": ("AcquireTaskRequest", "PushTaskOutputRequest"),
    "flwr.supernode.runtime.run_clientapp": ("pull_task_input", "push_message"),
    "flwr.cli.build": ("build_fab_from_files",),
    "flwr.supernode.cli": ("flower_supernode",),
}
# what the worker relies on beyond names: the SuperNode flags it is started with
SUPERNODE_FLAGS = ("--isolation", "--superexec-auth-secret-file")
# the Runtime API method guarded by the shared secret (as flower-superexec declares it)
ACQUIRE_TASK_METHOD = "/flwr.proto.Runtime/AcquireTask"

# What a SuperNode's log says about its connection to the SuperLink: Flower's own messages (matched as
# substrings of its stderr lines), by the event the site's supervisor reads from them, with the module that
# writes each (tests/test_warm_site.py checks that the installed Flower still does).
SUPERNODE_LOG: dict[str, tuple[tuple[str, str], ...]] = {
    "connected": (("SuperNode ID: ", "flwr.supernode.start_client_internal"),
                  ("Connection successful after ", "flwr.supercore.retry.http_retry")),
    "retrying": (("Connection attempt failed, retrying in ", "flwr.supercore.retry.http_retry"),),
    "gave-up": (("Giving up reconnection after ", "flwr.supercore.retry.http_retry"),),
    "stopping": (("SuperNode terminated gracefully", "flwr.supernode.start_client_internal"),),
}
SUPERNODE_LOOP_ENDED = "the SuperNode's connection loop ended"  # client/supernode.py's own line


def check() -> list[str]:
    """What of :data:`REQUIRED` the installed Flower lacks (empty when everything is there)."""
    missing = []
    for module, names in REQUIRED.items():
        try:
            mod = importlib.import_module(module)
        except ImportError as err:
            missing.append(f"{module} ({err})")
            continue
        missing += [f"{module}.{name}" for name in names if not hasattr(mod, name)]
    return missing


def missing_log_messages() -> list[str]:
    """The SuperNode log messages of :data:`SUPERNODE_LOG` that the installed Flower no longer writes."""
    import inspect

    missing = []
    for marks in SUPERNODE_LOG.values():
        for text, module in marks:
            try:
                source = inspect.getsource(importlib.import_module(module))
            except (ImportError, OSError) as err:
                missing.append(f"{module} ({err})")
                continue
            if text not in source:
                missing.append(f"{text!r} in {module}")
    return missing


def supernode_event(line: str) -> str | None:
    """``connected``, ``retrying``, ``gave-up``, ``stopping`` or ``loop-ended`` when a SuperNode log line says so."""
    if SUPERNODE_LOOP_ENDED in line:
        return "loop-ended"
    for event, marks in SUPERNODE_LOG.items():
        if any(text in line for text, _ in marks):
            return event
    return None


def run_supernode() -> None:
    """Flower's ``flower-supernode`` entry point, in this process (its arguments in ``sys.argv``).

    It returns when the SuperNode's connection loop has ended (:mod:`client.supernode`).
    """
    _get("flwr.supernode.cli", "flower_supernode")()


def flower_version() -> str:
    from importlib.metadata import version

    return version("flwr")


def _get(module: str, name: str) -> Any:
    return getattr(importlib.import_module(module), name)


# -- the Runtime API -----------------------------------------------------------------------------------
def _client(address: str, interceptors: list) -> Any:
    runtime_client = _get("flwr.supercore.runtime", "RuntimeHttpClient")
    version_interceptor = _get("flwr.supercore.interceptors", "RuntimeVersionHttpInterceptor")
    # no retry invoker: Flower's default one SIGINTs the whole process on a 401 (an expired task token);
    # the worker handles a failed call itself
    return runtime_client.from_server_address(
        server_address=address, insecure=True, root_certificates=None,
        interceptors=[version_interceptor(component_name="flwr-clientapp"), *interceptors], retry_invoker=None)


def load_secret(path: str | Path) -> bytes:
    return _get("flwr.supercore.auth.superexec_secret", "load_superexec_auth_secret")(str(path))


def executor_client(address: str, secret: bytes | None) -> Any:
    """A Runtime API client for acquiring tasks, signed with the SuperNode's shared secret."""
    interceptors = []
    if secret:
        auth = _get("flwr.supercore.interceptors", "SuperExecAuthHttpInterceptor")
        interceptors.append(auth(master_secret=secret, protected_methods=frozenset({ACQUIRE_TASK_METHOD})))
    return _client(address, interceptors)


def task_client(address: str, token: str) -> Any:
    """A Runtime API client for one task (its calls carry the task token)."""
    return _client(address, [_get("flwr.supercore.interceptors", "RuntimeTokenHttpInterceptor")(token)])


def acquire_clientapp_task(client: Any) -> tuple[str, int, int] | None:
    """Claim the oldest pending ClientApp task: ``(token, task_id, run_id)`` or None."""
    request = _get("flwr.proto.runtime_pb2", "AcquireTaskRequest")
    task_type = _get("flwr.supercore.constant", "TaskType")
    res = client.AcquireTask(request(supported_task_types=[task_type.CLIENT_APP]))
    if res.HasField("task") and res.token:
        return res.token, int(res.task.task_id), int(res.task.run_id)
    return None


@dataclass
class TaskInput:
    message: Any  # flwr.app.Message
    context: Any  # flwr.app.Context
    fab_hash: str  # as the SuperNode stored it
    fab_content: bytes
    fab_id: str
    fab_version: str


def pull_task_input(client: Any) -> TaskInput:
    """The task's message, context, run and FAB (the calls ``flwr-clientapp`` makes; sets the task identity)."""
    message, context, run, fab = _get("flwr.supernode.runtime.run_clientapp", "pull_task_input")(client)
    return TaskInput(message, context, fab.hash_str, fab.content, run.fab_id, run.fab_version)


def push_reply(client: Any, reply: Any, context: Any) -> None:
    _get("flwr.supernode.runtime.run_clientapp", "push_message")(client, reply, context)


def finish_task(client: Any, context: Any | None, *, ok: bool, details: str = "") -> None:
    """Tell the SuperNode the task ended (``completed`` or ``failed``) and hand back the context."""
    request = _get("flwr.proto.runtime_pb2", "PushTaskOutputRequest")
    sub_status = _get("flwr.common.constant", "SubStatus")
    to_proto = _get("flwr.common.serde", "context_to_proto")
    client.PushTaskOutput(request(context=to_proto(context) if context is not None else None,
                                  sub_status=sub_status.COMPLETED if ok else sub_status.FAILED, details=details))


def heartbeat(client: Any) -> Any:
    """A started heartbeat sender for the task (Flower's interval: the token lives 2 x 30 s past a beat)."""
    sender_cls = _get("flwr.supercore.heartbeat", "HeartbeatSender")
    sender = sender_cls(_get("flwr.supercore.heartbeat", "make_task_heartbeat_fn_http")(client))
    sender.start()
    return sender


def stop_heartbeat(sender: Any) -> None:
    if sender is not None and sender.is_running:
        sender.stop()


def raised_error_reply(message: Any, err: BaseException) -> Any:
    """The error reply Flower's ClientApp process sends for an exception (same code and reason format)."""
    from flwr.app import Error, Message

    code = _get("flwr.common.constant", "ErrorCode").CLIENT_APP_RAISED_EXCEPTION
    return Message(Error(code=code, reason=f"{type(err)}:<'{err}'>"), reply_to=message)


# -- a message without its content, to answer it from another process ---------------------------------
def message_header(message: Any) -> str:
    """The message without content, serialised (base64): enough to build a reply to it elsewhere."""
    strip = _get("flwr.app.message", "remove_content_from_message")
    to_proto = _get("flwr.common.serde", "message_to_proto")
    return base64.b64encode(to_proto(strip(message)).SerializeToString()).decode("ascii")


def message_from_header(header: str) -> Any:
    from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=E0611

    proto = ProtoMessage()
    proto.ParseFromString(base64.b64decode(header))
    return _get("flwr.common.serde", "message_from_proto")(proto)


def answer_for_dead_worker(address: str, token: str, reply: Any | None, node_id: int, run_id: int) -> None:
    """The worker died holding a task: push ``reply`` (None: it had already replied) and fail the task."""
    from flwr.app import Context, RecordDict

    client = task_client(address, token)
    try:
        context = Context(run_id=run_id, node_id=node_id, node_config={}, state=RecordDict(), run_config={})
        if reply is not None:
            push_reply(client, reply, context)
        finish_task(client, None, ok=False, details="the site worker died while running this task")
    finally:
        client.close()


# -- FABs ------------------------------------------------------------------------------------------------
def build_fab(app_dir: str | Path) -> bytes:
    """The FAB ``flwr run APP_DIR`` would submit (deterministic: fixed zip dates, sorted files).

    Flower's own builder walks every file under ``app_dir`` (a checkout's ``.venv`` too);
    :func:`nearl_protocol.bundle.bundle_files` hands it the same files without that walk.
    """
    import warnings

    from nearl_protocol.bundle import bundle_files

    with warnings.catch_warnings():  # pathspec's deprecation notices, once per pattern
        warnings.simplefilter("ignore", DeprecationWarning)
        return _get("flwr.cli.build", "build_fab_from_files")(bundle_files(app_dir))[0]


def fab_sha256(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()
