"""Faster SuperNode processes for the deployment engine (flwr 1.42; run as ``python -m``).

Stock Flower spends most of a BAFFLE round waiting, not computing (measured in
``benchmarks/FLOWER.md``): an idle SuperNode sleeps a fixed 3 s between pulls from the SuperLink and
0.5 s between checks for its ClientApp's reply, and with ``--isolation subprocess`` its SuperExec
polls for tasks every 1 s and starts a fresh ``flwr-clientapp`` process per message, which imports
torch and Flower again (≈2 s of CPU each; several at once on a small machine). Two entry points:

``python -m baffle.flower.node supernode [--poll-interval S] [--clientapp-runtime HOST:PORT] -- <flower-supernode arguments>``
    Flower's own ``flower-supernode`` with its fixed sleeps capped at S seconds (idle pulls from
    the SuperLink and reply checks). Nothing else changes. S = 0 leaves Flower's sleeps as they are.
    ``--clientapp-runtime``: also start the ClientApp runtime below as a child process, serving
    this node's Runtime API at HOST:PORT (pass ``--isolation process --port PORT`` to Flower).

``python -m baffle.flower.node clientapp --runtime-api-address HOST:PORT [--poll-interval S] [--parent-pid P]``
    A long-running ClientApp runtime for a SuperNode started with ``--isolation process`` (which
    then starts no SuperExec): it acquires the node's ClientApp tasks from the SuperNode's Runtime
    API (polling every S seconds) and runs each in this process, through the same Runtime API
    calls ``flwr-clientapp`` makes (pull task input and message, push reply and task output,
    task heartbeats). torch, Flower and the app are imported once, and the app's module-level
    caches (baffle's ``client_app`` keeps each node's partition and model) survive between
    messages. Trade-off: the tasks of all runs on this node share one process (no per-message
    process isolation), and an app module is loaded once per process, so start one runtime per
    SuperNode per federation (``baffle deploy`` does). Exits when the process P (its SuperNode)
    is gone.

This is the opt-in accelerator of ``baffle deploy --fast-nodes``. Both entry points rely on flwr
internals (written against flwr 1.42; every name is listed in ``baffle.flower.fastpath.NEEDS``).
Both check them all at start-up; when one is missing or changed, ``supernode`` prints one warning
line and runs Flower's stock ``flower-supernode`` instead (``--isolation subprocess``, Flower's own
intervals, no runtime), and ``clientapp`` exits with that line.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from logging import DEBUG, ERROR, INFO, WARNING

DEFAULT_POLL_INTERVAL = 0.1  # seconds; `baffle deploy --node-poll-interval`
HEARTBEAT_EVERY = 10.0  # seconds between task heartbeats (Flower expires a claimed task after 30 s)
MESSAGE_WAIT = 30.0  # seconds a claimed task waits for its message to be stored by the SuperNode


# ---- SuperNode with short sleeps ------------------------------------------------------------------

class _CappedClock:
    """Stands in for the ``time`` module inside one Flower module: ``sleep`` is capped."""

    def __init__(self, cap: float):
        self.cap = cap

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap))

    def __getattr__(self, name):
        return getattr(time, name)


def fast_object_pulls(module, cap: float) -> None:
    """Make ``module``'s ``pull_objects`` retry an object that is not uploaded yet after 20 ms (doubling
    up to ``cap``) instead of Flower's 1 s (doubling up to 10 s): a message can be seen a moment
    before its objects (the model, the reply) have all arrived."""
    import functools

    from flwr.supercore.inflatable import inflatable_utils

    if getattr(module, "pull_objects", None) is not inflatable_utils.pull_objects:
        raise RuntimeError(f"{module.__name__}.pull_objects is not the function baffle patches; "
                           "run without --fast-nodes")
    module.pull_objects = functools.partial(inflatable_utils.pull_objects, initial_backoff=0.02,
                                            backoff_cap=max(cap, 0.02))


def patch_supernode_sleeps(cap: float) -> None:
    """Cap the fixed sleeps of Flower's SuperNode main loop (idle pull 3 s, reply check 0.5 s) and
    its retry delay for objects not yet on the SuperLink (1 s)."""
    from flwr.supernode import start_client_internal as loop

    if getattr(loop, "time", None) is not time:
        raise RuntimeError("this Flower version's SuperNode loop is not the one baffle patches; "
                           "run without --fast-nodes")
    fast_object_pulls(loop, cap)
    loop.time = _CappedClock(cap)


def stock_supernode_argv(flower_args: list[str]) -> list[str]:
    """Flower's own ``flower-supernode`` with these arguments, ``--isolation`` set to ``subprocess``."""
    from baffle.flower.launch import flower_program

    args = list(flower_args)
    if "--isolation" in args:
        args[args.index("--isolation") + 1] = "subprocess"
    else:
        args += ["--isolation", "subprocess"]
    return [flower_program("flower-supernode"), *args]


def run_supernode(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m baffle.flower.node supernode")
    p.add_argument("--poll-interval", type=float, default=DEFAULT_POLL_INTERVAL)
    p.add_argument("--clientapp-runtime", metavar="HOST:PORT")
    p.add_argument("flower_args", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    rest = args.flower_args[1:] if args.flower_args[:1] == ["--"] else args.flower_args
    from baffle.flower.fastpath import fast_path_problem

    problem = fast_path_problem()
    if problem:  # one line, then Flower's stock SuperNode in this process's place (same PID)
        print(f"baffle: warning: {problem}", file=sys.stderr, flush=True)
        stock = stock_supernode_argv(rest)
        os.execv(stock[0], stock)
        return  # not reached (execv replaces this process); tests replace execv
    if args.poll_interval > 0:
        patch_supernode_sleeps(args.poll_interval)
    if args.clientapp_runtime:
        import subprocess

        subprocess.Popen([sys.executable, "-m", "baffle.flower.node", "clientapp", "--runtime-api-address",
                          args.clientapp_runtime, "--poll-interval", str(args.poll_interval or 1.0),
                          "--parent-pid", str(os.getpid())])
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *rest]
    flower_supernode()


# ---- long-running ClientApp runtime ---------------------------------------------------------------

def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed child not yet reaped by its parent is a zombie: gone for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


def _watch_parent(pid: int) -> None:
    def watch():
        while _process_alive(pid):
            time.sleep(0.5)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


class _Heartbeat:
    """Task heartbeats while a task runs (failures are ignored: the task just expires)."""

    def __init__(self, client):
        from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest

        self._client, self._request = client, SendTaskHeartbeatRequest()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="task-heartbeat", daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(HEARTBEAT_EVERY):
            try:
                self._client.SendTaskHeartbeat(self._request)
            except Exception as e:  # noqa: BLE001 - keep the runtime alive
                from flwr.supercore import log
                log(DEBUG, "task heartbeat failed: %s", e)

    def stop(self):
        self._stop.set()


class ClientAppRuntime:
    """Serve a SuperNode's ClientApp tasks in this process (see the module docstring)."""

    def __init__(self, address: str, poll_interval: float = DEFAULT_POLL_INTERVAL):
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient

        self.address, self.poll_interval = address, poll_interval
        self._apps: dict[str, object] = {}  # FAB hash → loaded ClientApp
        self._control = RuntimeHttpClient.from_server_address(
            server_address=address, insecure=True, root_certificates=None,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
            retry_invoker=make_simple_http_retry_invoker())

    def serve(self, max_tasks: int | None = None) -> None:
        from flwr.proto.runtime_pb2 import AcquireTaskRequest
        from flwr.supercore.constant import TaskType

        request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
        done = 0
        while max_tasks is None or done < max_tasks:
            res = self._control.AcquireTask(request)
            if res.HasField("task") and res.token:
                self.run_task(res.token)
                done += 1
            else:
                time.sleep(self.poll_interval)

    def _task_client(self, token: str):
        from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient

        return RuntimeHttpClient.from_server_address(
            server_address=self.address, insecure=True, root_certificates=None,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                          RuntimeTokenHttpInterceptor(token)],
            retry_invoker=make_simple_http_retry_invoker())

    def _pull_input(self, client):
        """(message, context, run, fab) of the claimed task, as ``flwr-clientapp`` pulls them."""
        from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
        from flwr.proto.node_pb2 import Node
        from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest
        from flwr.supercore.inflatable.inflatable_protobuf_utils import (
            make_confirm_message_received_fn_protobuf, make_pull_object_fn_protobuf)
        from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
        from flwr.supercore.task_identity import TaskIdentity
        from flwr.app import Message

        res = client.PullTaskInput(PullTaskInputRequest())
        TaskIdentity.task_id, TaskIdentity.run_id = res.task_id, res.run.run_id
        TaskIdentity.node_id = res.context.node_id
        context, run, fab = context_from_proto(res.context), run_from_proto(res.run), fab_from_proto(res.fab)
        deadline = time.monotonic() + MESSAGE_WAIT
        # the SuperNode creates the task a moment before it stores the message: wait for it
        while not (pulled := client.PullMessages(PullAppMessagesRequest())).messages_list:
            if time.monotonic() > deadline:
                raise RuntimeError("no message for this task from the SuperNode's Runtime API")
            time.sleep(0.01)
        tree = pulled.message_object_trees[0]
        node = Node(node_id=context.node_id)
        # The task can also be claimed before the SuperNode has its objects (the model) from the
        # SuperLink; Flower's first retry would come after 1 s: retry at the poll interval instead.
        message = pull_and_inflate_object_from_tree(
            tree, make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
            make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
            return_type=Message, initial_backoff=0.02, backoff_cap=max(self.poll_interval, 0.02))
        message.metadata.__dict__["_message_id"] = tree.object_id
        return message, context, run, fab

    def _client_app(self, run, fab):
        app = self._apps.get(fab.hash_str)
        if app is None:
            from flwr.cli.install import install_from_fab
            from flwr.clientapp.utils import get_load_client_app_fn

            install_from_fab(fab.content, skip_prompt=True)
            app = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)(
                run.fab_id, run.fab_version, fab.hash_str)
            self._apps[fab.hash_str] = app
        return app

    def run_task(self, token: str) -> None:
        from flwr.app import Error, Message
        from flwr.clientapp.client_app import LoadClientAppError
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supercore import log
        from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

        client = self._task_client(token)
        heartbeat = _Heartbeat(client)
        message = reply = context = None
        sub_status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
        try:
            message, context, run, fab = self._pull_input(client)
            reply = self._client_app(run, fab)(message=message, context=context)
            sub_status, details = SubStatus.COMPLETED, ""
        except Exception as ex:  # noqa: BLE001 - reported to the server as an error reply
            code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION if isinstance(ex, LoadClientAppError) \
                else ErrorCode.CLIENT_APP_RAISED_EXCEPTION
            reason = str(type(ex)) + ":<'" + str(ex) + "'>"
            log(ERROR, "ClientApp raised an exception", exc_info=ex)
            details = reason
            if message is not None:
                reply = Message(Error(code=code, reason=reason), reply_to=message)
        finally:
            heartbeat.stop()
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
            except Exception as ex:  # noqa: BLE001
                log(ERROR, "failed to push the reply message", exc_info=ex)
            push_task_output(client=client, context=context, sub_status=sub_status, details=details)
            client.close()


def run_clientapp_runtime(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m baffle.flower.node clientapp")
    p.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API (host:port)")
    p.add_argument("--poll-interval", type=float, default=DEFAULT_POLL_INTERVAL)
    p.add_argument("--parent-pid", type=int, help="exit when this process (the SuperNode) is gone")
    args = p.parse_args(argv)
    if args.parent_pid:
        _watch_parent(args.parent_pid)
    from baffle.flower.fastpath import fast_path_problem

    problem = fast_path_problem()
    if problem:
        sys.exit(f"baffle: {problem}")
    from flwr.supercore import log

    runtime = ClientAppRuntime(args.runtime_api_address, max(args.poll_interval, 0.01))
    log(INFO, "baffle ClientApp runtime serving %s (poll every %.2f s)", args.runtime_api_address,
        runtime.poll_interval)
    try:
        runtime.serve()
    except KeyboardInterrupt:
        log(WARNING, "baffle ClientApp runtime interrupted")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"supernode": run_supernode, "clientapp": run_clientapp_runtime}
    if not argv or argv[0] not in commands:
        sys.exit(f"usage: python -m baffle.flower.node {{{','.join(commands)}}} ...")
    commands[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
