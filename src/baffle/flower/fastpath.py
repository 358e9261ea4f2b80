"""What the opt-in accelerator (``baffle deploy --fast-nodes``) needs from flwr's internals.

``baffle deploy`` runs on Flower's public API by default. ``--fast-nodes`` adds the accelerator of
``baffle.flower.node`` (SuperNode sleeps capped, a long-running ClientApp runtime per SuperNode,
faster object-pull retries in the ServerApp), which is built on flwr names that are not part of
Flower's public API and may change in any release. ``NEEDS`` lists every one of them, with what is
used of each (keyword parameters, attributes, protobuf fields, identities, private conventions);
``problems()`` checks them all against the installed flwr, and ``fast_path_problem()`` turns the
result into one line. When that line is not None, callers fall back to the stock path with one
warning (``baffle deploy`` before it starts anything; ``node`` and the ServerApp again at their own
start-up, in case a different environment runs them). The list was written against flwr 1.42.0;
``tests/flower`` checks that every flwr import of ``node.py`` appears here.
"""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass


@dataclass(frozen=True)
class Need:
    """One internal flwr object and what of it is used.

    ``target``: "module" or "module:qualified.name". ``params``: keyword parameters passed to it
    (callables); ``positional``: positional arguments passed; ``members``: attributes read;
    ``fields``: protobuf message fields; ``settable``: class attributes assigned; ``same_as``: it must
    be this other object ("module:name"; "time" is the stdlib module); ``source``: text its source
    must contain (private conventions that no signature shows).
    """

    target: str
    params: tuple[str, ...] = ()
    positional: int = 0
    members: tuple[str, ...] = ()
    fields: tuple[str, ...] = ()
    settable: tuple[str, ...] = ()
    same_as: str | None = None
    source: str | None = None


_INFLATE = "flwr.supercore.inflatable.inflatable_utils"
_PROTO = "flwr.proto.runtime_pb2"

NEEDS: tuple[Need, ...] = (
    # SuperNode main loop: its fixed sleeps and object pulls (node.patch_supernode_sleeps)
    Need("flwr.supernode.start_client_internal:time", same_as="time"),
    Need("flwr.supernode.start_client_internal:pull_objects", same_as=f"{_INFLATE}:pull_objects"),
    Need(f"{_INFLATE}:pull_objects", params=("initial_backoff", "backoff_cap"), positional=2),
    Need("flwr.supernode.cli.flower_supernode:flower_supernode"),
    # ServerApp side: the deployment grid's reply-object pulls (server_app.accelerate_grid)
    Need("flwr.superlink.grid.http_grid:pull_objects", same_as=f"{_INFLATE}:pull_objects"),
    # SuperExec task-poll interval (--fast-nodes with --isolation subprocess)
    Need("flwr.supercore.superexec.run_superexec:_TASK_POLL_INTERVAL_ENV",
         source="FLWR_SUPEREXEC_TASK_POLL_INTERVAL"),
    # long-running ClientApp runtime: the Runtime API client as flwr-clientapp / SuperExec use it
    Need("flwr.supercore.runtime:RuntimeHttpClient.from_server_address",
         params=("server_address", "insecure", "root_certificates", "interceptors", "retry_invoker")),
    Need("flwr.supercore.runtime:RuntimeHttpClient",
         members=("AcquireTask", "PullTaskInput", "PullMessages", "PullObject", "ConfirmMessageReceived",
                  "SendTaskHeartbeat", "PushMessages", "PushObject", "PushTaskOutput", "close")),
    Need("flwr.supercore.interceptors:RuntimeVersionHttpInterceptor", params=("component_name",)),
    Need("flwr.supercore.superexec.run_superexec", source='component_name="SuperExec"'),
    Need("flwr.supernode.runtime.run_clientapp", source='component_name="flwr-clientapp"'),
    Need("flwr.supercore.interceptors:RuntimeTokenHttpInterceptor", positional=1),
    Need("flwr.supercore.retry:make_simple_http_retry_invoker"),
    Need(f"{_PROTO}:AcquireTaskRequest", fields=("supported_task_types",)),
    Need(f"{_PROTO}:AcquireTaskResponse", fields=("task", "token")),
    Need(f"{_PROTO}:SendTaskHeartbeatRequest"),
    Need(f"{_PROTO}:PullTaskInputRequest"),
    Need(f"{_PROTO}:PullTaskInputResponse", fields=("task_id", "run", "context", "fab")),
    Need(f"{_PROTO}:PullAppMessagesRequest"),
    Need(f"{_PROTO}:PullAppMessagesResponse", fields=("messages_list", "message_object_trees")),
    Need("flwr.proto.node_pb2:Node", fields=("node_id",)),
    Need("flwr.supercore.constant:TaskType", members=("CLIENT_APP",)),
    Need("flwr.common.serde:context_from_proto", positional=1),
    Need("flwr.common.serde:run_from_proto", positional=1),
    Need("flwr.common.serde:fab_from_proto", positional=1),
    Need("flwr.supercore.inflatable.inflatable_protobuf_utils:make_pull_object_fn_protobuf", positional=3),
    Need("flwr.supercore.inflatable.inflatable_protobuf_utils:make_confirm_message_received_fn_protobuf",
         positional=3),
    Need(f"{_INFLATE}:pull_and_inflate_object_from_tree",
         params=("return_type", "initial_backoff", "backoff_cap"), positional=3),
    Need("flwr.supercore.task_identity:TaskIdentity", settable=("task_id", "run_id", "node_id")),
    Need("flwr.app:Metadata.message_id", source='"_message_id"'),  # set through metadata.__dict__
    Need("flwr.cli.install:install_from_fab", params=("skip_prompt",), positional=1),
    Need("flwr.clientapp.utils:get_load_client_app_fn", params=("default_app_ref", "app_path", "multi_app")),
    Need("flwr.clientapp.client_app:LoadClientAppError"),
    Need("flwr.common.constant:ErrorCode", members=("LOAD_CLIENT_APP_EXCEPTION", "CLIENT_APP_RAISED_EXCEPTION")),
    Need("flwr.common.constant:SubStatus", members=("FAILED", "COMPLETED")),
    Need("flwr.supernode.runtime.run_clientapp:push_message", positional=3),
    Need("flwr.supernode.runtime.run_clientapp:push_task_output",
         params=("client", "context", "sub_status", "details")),
    Need("flwr.supercore:log", positional=2),
)


def _resolve(target: str):
    module_name, _, qualname = target.partition(":")
    if module_name == "time" and not qualname:
        import time
        return time
    obj = importlib.import_module(module_name)
    for part in filter(None, qualname.split(".")):
        obj = getattr(obj, part)
    return obj


def _params_problem(obj, need: Need) -> str | None:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return "no inspectable signature"
    kinds = [p.kind for p in sig.parameters.values()]
    has_kw = inspect.Parameter.VAR_KEYWORD in kinds
    absent = [n for n in need.params if n not in sig.parameters and not has_kw]
    if absent:
        return f"no parameter {', '.join(absent)}"
    positional = [p for p in sig.parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if need.positional and len(positional) < need.positional and inspect.Parameter.VAR_POSITIONAL not in kinds:
        return f"takes {len(positional)} positional arguments, {need.positional} are passed"
    required_kw = [p.name for p in sig.parameters.values()
                   if p.kind == p.KEYWORD_ONLY and p.default is p.empty and p.name not in need.params]
    if required_kw:
        return f"now requires {', '.join(required_kw)}"
    return None


def _settable_problem(obj, names: tuple[str, ...]) -> str | None:
    for name in names:
        meta_attr = getattr(type(obj), name, None)
        if isinstance(meta_attr, property):
            if meta_attr.fset is None:
                return f"{name} is read-only"
        elif name not in getattr(obj, "__dict__", {}):
            return f"no attribute {name}"
    return None


def _source_problem(obj, text: str) -> str | None:
    target = obj.fget if isinstance(obj, property) else obj
    try:
        source = inspect.getsource(target)
    except (OSError, TypeError):
        return "source not available to check"
    return None if text in source else f"no longer contains {text}"


def check_need(need: Need) -> str | None:
    """None if ``need`` holds for the installed flwr, else why not (one short phrase)."""
    try:
        obj = _resolve(need.target)
    except (ImportError, AttributeError) as e:
        return f"missing ({type(e).__name__}: {e})"
    if need.same_as is not None:
        try:
            other = _resolve(need.same_as)
        except (ImportError, AttributeError):
            return f"missing {need.same_as}"
        if obj is not other:
            return f"changed (is no longer {need.same_as})"
    if need.params or need.positional:
        problem = _params_problem(obj, need)
        if problem:
            return f"changed ({problem})"
    absent = [m for m in need.members if not hasattr(obj, m)]
    if absent:
        return f"changed (no {', '.join(absent)})"
    if need.fields:
        descriptor = getattr(obj, "DESCRIPTOR", None)
        known = set(getattr(descriptor, "fields_by_name", {}) or {})
        absent = [f for f in need.fields if f not in known]
        if absent:
            return f"changed (no field {', '.join(absent)})"
    if need.settable:
        problem = _settable_problem(obj, need.settable)
        if problem:
            return f"changed ({problem})"
    if need.source is not None:
        if isinstance(obj, str):
            problem = None if obj == need.source else f"is {obj!r}, not {need.source!r}"
        else:
            problem = _source_problem(obj, need.source)
        if problem:
            return f"changed ({problem})"
    return None


def problems(needs: tuple[Need, ...] = NEEDS) -> list[str]:
    """"target: reason" for every need the installed flwr does not meet (empty: the fast path works)."""
    out = []
    for need in needs:
        reason = check_need(need)
        if reason:
            out.append(f"{need.target}: {reason}")
    return out


def flwr_version() -> str:
    try:
        from importlib.metadata import version
        return version("flwr")
    except Exception:  # noqa: BLE001 - only for the message
        return "unknown"


def fast_path_problem(needs: tuple[Need, ...] = NEEDS) -> str | None:
    """None if the accelerator can run on the installed flwr; else the one warning line to print."""
    found = problems(needs)
    if not found:
        return None
    more = f" (+{len(found) - 1} more)" if len(found) > 1 else ""
    return (f"--fast-nodes needs flwr internals that flwr {flwr_version()} lacks or changed: {found[0]}{more}; "
            "using Flower's stock path instead")


__all__ = ["NEEDS", "Need", "check_need", "fast_path_problem", "problems"]
