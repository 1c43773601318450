"""``ProcessGrid``: a Flower ``Grid`` whose ClientApps run in client processes of their own,
messages crossing as Flower's protobuf bytes. The benchmarks that compare strategies or
count parallel clients use it (``bench/many_clients.py``, ``bench/parallel_candidates.py``):
unlike ``LocalGrid`` it pays serialisation, keeps the clients' memory out of the server
process and runs several clients at once; unlike Flower's simulation engine it has no Ray
daemons competing for a small machine's cores."""

from __future__ import annotations

import contextlib
import os
import time

from fedsms_flower.local_grid import LocalGrid


class ProcessGrid(LocalGrid):
    """A Flower ``Grid`` whose ClientApps run in ``workers`` spawned client processes (one torch
    thread each by default); every message and reply crosses the process boundary as
    Flower's own protobuf bytes (``flwr.common.serde``), as through a SuperLink, minus the
    network. A free worker takes the next message (like the simulation engine's actors),
    so ``workers`` clients train at once.

    Counters for the benchmarks: ``wait_s`` (the server blocked on replies), ``serde_s``
    (serialising messages and parsing replies in this process), ``bytes_down`` /
    ``bytes_up``, and ``busy`` (per reply: the worker's pid and the perf_counter start and
    end of its ClientApp call, the clock being system-wide on Linux). Start-up (spawn,
    imports, building the app) happens in ``__init__``, outside any round. Use ``with`` or
    ``close()``.
    """

    def __init__(self, app_factory, node_configs: list[dict], workers: int, threads: int = 1, run_config=None):
        import multiprocessing

        super().__init__(None, node_configs, run_config)  # node ids, ``sent``, ``drop``: as LocalGrid
        self.wait_s = self.serde_s = 0.0
        self.bytes_down = self.bytes_up = 0
        self.busy: list[tuple[int, float, float]] = []
        self.worker: list[dict[str, float]] = []
        ctx = multiprocessing.get_context("spawn")
        self._workers = []
        for _ in range(workers):
            parent, child = ctx.Pipe()
            process = ctx.Process(target=_grid_worker, args=(app_factory, threads, child, self.run_config), daemon=True)
            process.start()
            child.close()
            self._workers.append((process, parent))
        for _, conn in self._workers:
            conn.recv()  # ready: imports done, app built

    def send_and_receive(self, messages, *, timeout=None):
        """Each message to the next free worker; the replies, in the order of ``messages``."""
        import uuid
        from multiprocessing.connection import wait

        from flwr.common.serde import message_from_proto, message_to_proto
        from flwr.proto.message_pb2 import Message as ProtoMessage

        pending = iter(list(enumerate(messages)))
        replies: dict[int, object] = {}
        busy: dict = {}

        def dispatch(conn) -> None:
            for i, message in pending:
                message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
                self.sent.append(message)
                if self.drop(message):
                    continue
                start = time.perf_counter()
                data = message_to_proto(message).SerializeToString()
                self.serde_s += time.perf_counter() - start
                self.bytes_down += len(data)
                node = message.metadata.dst_node_id
                conn.send((node, self.nodes[node]))
                conn.send_bytes(data)
                busy[conn] = i
                return

        for _, conn in self._workers:
            dispatch(conn)
        while busy:
            start = time.perf_counter()
            ready = wait(list(busy))
            self.wait_s += time.perf_counter() - start
            for conn in ready:
                pid, began, ended, worker = conn.recv()
                data = conn.recv_bytes()
                start = time.perf_counter()
                reply = message_from_proto(ProtoMessage.FromString(data))
                reply.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # what the SuperLink stamps
                self.serde_s += time.perf_counter() - start
                self.bytes_up += len(data)
                self.busy.append((pid, began, ended))
                self.worker.append(worker)
                replies[busy.pop(conn)] = reply
                dispatch(conn)
        return [replies[i] for i in sorted(replies)]

    def close(self) -> None:
        """Stop the client processes; safe to call twice."""
        for process, conn in self._workers:
            with contextlib.suppress(OSError):  # a worker that died already
                conn.send(None)
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
        self._workers = []

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _grid_worker(app_factory, threads: int, conn, run_config) -> None:
    """A client process of ``ProcessGrid``: builds the ClientApp once, then runs each message."""
    import torch
    from flwr.app import Context, Message, RecordDict
    from flwr.common import Error
    from flwr.common.serde import message_from_proto, message_to_proto
    from flwr.proto.message_pb2 import Message as ProtoMessage
    from flwr.supercore.task_identity import TaskIdentity

    torch.set_num_threads(threads)
    app = app_factory()
    TaskIdentity.run_id, TaskIdentity.task_id = 1, 1
    conn.send("ready")
    while (job := conn.recv()) is not None:
        node, node_config = job
        data = conn.recv_bytes()
        cpu0, parse0 = time.process_time(), time.perf_counter()
        message = message_from_proto(ProtoMessage.FromString(data))
        parse_s = time.perf_counter() - parse0
        TaskIdentity.node_id = node
        context = Context(run_id=1, node_id=node, node_config=node_config, state=RecordDict(), run_config=run_config)
        began, app_cpu0 = time.perf_counter(), time.process_time()
        try:
            reply = app(message, context)
        except Exception as error:  # what Flower returns for a failing ClientApp
            reply = Message(Error(code=0, reason=f"{type(error).__name__}: {error}"), reply_to=message)
        ended, app_cpu = time.perf_counter(), time.process_time() - app_cpu0
        data = message_to_proto(reply).SerializeToString()
        serde_s = parse_s + time.perf_counter() - ended
        worker = {"app_cpu_s": app_cpu, "cpu_s": time.process_time() - cpu0, "serde_s": serde_s}
        conn.send((os.getpid(), began, ended, worker))
        conn.send_bytes(data)


def fedsms_client_app():
    """The fedsms ClientApp (a picklable factory for ``ProcessGrid``)."""
    from fedsms_client.app import make_client_app

    return make_client_app()
