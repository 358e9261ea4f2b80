"""An in-memory stand-in for a Flower ``Grid``: messages go straight to baffle's real ClientApp.

``MemoryGrid`` has the public ``Grid`` methods the ServerApp uses (``get_node_ids``,
``push_messages``, ``pull_messages``, ``send_and_receive``) and answers each message by calling
``baffle.flower.client_app.app`` (the real handlers) with a per-node ``Context`` — no Flower
process, so server logic (sampling, cursors, resume, evaluation on nodes) is tested in seconds.
A handler that raises becomes an error reply, as Flower's runtime makes it. ``fail(node, msg)``
may return True to drop a message (a node that does not answer) or raise to simulate a crash.
"""
from __future__ import annotations

import itertools

from flwr.app import Context, Error, Message, Metadata, RecordDict

from baffle.flower.cli import flatten
from baffle.flower.client_app import app as client_app


class MemoryGrid:
    def __init__(self, table: dict, partitions: dict[int, int], node_config: dict | None = None, fail=None):
        self.run_config = flatten(table)
        self.partitions = dict(partitions)  # node id → partition id
        self.node_config = node_config or {}
        self.fail = fail
        self.contexts = {}
        self.sent: list[Message] = []  # every message pushed (after its metadata is set)
        self._replies: dict[str, Message] = {}
        self._ids = itertools.count(1)

    def get_node_ids(self):
        return list(self.partitions)

    def context(self, node: int) -> Context:
        if node not in self.contexts:
            count = next((v for k, v in self.run_config.items() if k.split(".")[-1] == "clients"), None)
            config = {"partition-id": self.partitions[node], "num-partitions": count or len(self.partitions),
                      **self.node_config}
            self.contexts[node] = Context(run_id=1, node_id=node, node_config=config, state=RecordDict(),
                                          run_config=self.run_config)
        return self.contexts[node]

    def push_messages(self, messages):
        ids = []
        for m in messages:
            mid = f"m{next(self._ids)}"
            node = m.metadata.dst_node_id
            msg = Message(m.content, metadata=Metadata(
                run_id=1, message_id=mid, src_node_id=0, dst_node_id=node, reply_to_message_id="", group_id="",
                created_at=0.0, ttl=60.0, message_type=m.metadata.message_type))
            self.sent.append(msg)
            ids.append(mid)
            if node not in self.partitions or (self.fail is not None and self.fail(node, msg)):
                continue
            meta = Metadata(run_id=1, message_id=f"r{mid}", src_node_id=node, dst_node_id=0,
                            reply_to_message_id=mid, group_id="", created_at=0.0, ttl=60.0,
                            message_type=msg.metadata.message_type)
            try:
                reply = client_app(message=msg, context=self.context(node))
                out = Message(reply.error, metadata=meta) if reply.has_error() else Message(reply.content,
                                                                                            metadata=meta)
            except Exception as e:  # noqa: BLE001 - as Flower's runtime reports a ClientApp exception
                out = Message(Error(code=0, reason=f"{type(e)}:<'{e}'>"), metadata=meta)
            self._replies[mid] = out
        return ids

    def pull_messages(self, message_ids):
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))
