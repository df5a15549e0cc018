"""One replica's stateful histories shared by its worker processes: a store service and its client.

With ``server.workers: N`` > 1 the kernel spreads *connections* over N processes, so a history kept
in each worker's memory would see a client that opens N connections as N smaller clients. The
supervisor therefore holds every in-memory store of the replica (``store: {kind: memory}``: Blacklight's
hash store, the k-NN embedding store) in a :class:`StoreService` and each worker talks to it through a
:class:`RemoteStore`, the same :class:`~robustgate.defenses.stateful.store.HistoryStore` interface the
stage uses in one process. The scoring runs where the histories are: a query attack is judged on
its whole history whichever worker answers it, and a k-NN history (up to 10,000 embeddings per
client) never moves.

Transport: a Unix socket in a directory only the serving user can open (``tempfile.mkdtemp``, mode
0700), one connection per calling thread, blocking calls (the batch thread waits without the GIL).
Frames: ``<u32 header length><u32 body length>``, a JSON header, then the arrays it describes
(``arrays``: ``[[dtype, shape], ...]``, little-endian ``u8``/``i8``/``f4``/``f8`` only) back to back --
no pickle crosses the socket. Operations (``op``): ``open`` (a store for a namespace -> its id, its
fingerprint key and bounds), ``observe`` (a batch of clients' queries, scored and recorded, as the
store's ``observe_batch``), ``observe_unblocked`` (the same after the clients' block check, as the
store's ``observe_unblocked``), ``blocked`` (several clients' block ends in one call), ``detect``,
``block``, ``stats``, ``clear``. A call of a pipeline batch costs one round trip,
``observe_unblocked`` (``detect`` and ``block`` only for a batch with detections).

Namespaces: a store is opened for (stage name, method, what the remembered queries mean -- the
encoder's sha256 for k-NN --, its ``store:`` config, Blacklight's ``top_k``); every worker of the
replica, and every reload that keeps those, opens the same store (the histories and blocks survive a
reload, as in one process). A new namespace for a stage replaces that stage's store (a refitted
encoder's embeddings do not compare with the old ones); a worker still calling the old id gets an
error that its failure policy handles until it reloads too.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import socketserver
import struct
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np

from robustgate.defenses.stateful.store import HistoryStore

log = logging.getLogger("robustgate.proxy")

STORE_SOCKET_ENV = "ROBUSTGATE_STORE_SOCKET"  # the supervisor -> its workers: the service's socket path
_FRAME = struct.Struct("<II")
_DTYPES = {"u8": np.dtype("<u8"), "i8": np.dtype("<i8"), "f4": np.dtype("<f4"), "f8": np.dtype("<f8")}
_NAMES = {v: k for k, v in _DTYPES.items()}
STATS_TIMEOUT_S = 0.5  # a stats call (the gauges' refresh, once a second per worker) waits no longer
MAX_FRAME = 1 << 30  # a frame longer than this is refused (a batch of 64 k-NN queries is ~20 KiB)


class StoreError(ConnectionError):
    """The store service could not answer (unreachable, or it refused the call): the stage fails and
    the pipeline's failure policy decides the items' fate."""


# ---- frames (pure functions) ---------------------------------------------------------------------

def pack(header: dict[str, Any], arrays: list[np.ndarray] = ()) -> bytes:
    """One frame: ``header`` (JSON) and ``arrays`` (each described in ``header["arrays"]``)."""
    arrays = [np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")) for a in arrays]
    for a in arrays:
        if a.dtype not in _NAMES:
            raise ValueError(f"cannot send an array of {a.dtype}")
    head = json.dumps({**header, "arrays": [[_NAMES[a.dtype], list(a.shape)] for a in arrays]}).encode()
    body = b"".join(a.tobytes() for a in arrays)
    return _FRAME.pack(len(head), len(body)) + head + body


def unpack(head: bytes, body: bytes | bytearray) -> tuple[dict[str, Any], list[np.ndarray]]:
    """A frame's header and arrays (views of ``body``); ValueError when they do not add up to it."""
    header = json.loads(head)
    if not isinstance(header, dict):
        raise ValueError("frame header must be a JSON object")
    arrays, at = [], 0
    for name, shape in header.pop("arrays", []):
        dtype = _DTYPES.get(name)
        if dtype is None or not all(isinstance(s, int) and s >= 0 for s in shape):
            raise ValueError(f"bad array description {name!r} {shape!r}")
        size = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
        if at + size > len(body):
            raise ValueError("frame body shorter than its arrays")
        arrays.append(np.frombuffer(body, dtype=dtype, count=size // dtype.itemsize, offset=at).reshape(shape))
        at += size
    if at != len(body):
        raise ValueError("frame body longer than its arrays")
    return header, arrays


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    """``n`` bytes from ``sock``, in a writable buffer (the arrays unpacked from it are writable, as
    the stores' compiled paths want)."""
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            raise ConnectionError("connection closed")
        got += k
    return buf


def read_frame(sock: socket.socket) -> tuple[dict[str, Any], list[np.ndarray]]:
    hlen, blen = _FRAME.unpack(_recv_exact(sock, _FRAME.size))
    if hlen + blen > MAX_FRAME:
        raise ValueError(f"frame of {hlen + blen} bytes is over the limit of {MAX_FRAME}")
    head = _recv_exact(sock, hlen)
    return unpack(head, _recv_exact(sock, blen) if blen else bytearray())


def _split(data: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    return np.split(data, np.cumsum(sizes)[:-1]) if sizes else []


# ---- the service (the supervisor's) ----------------------------------------------------------------

class StoreService:
    """The replica's in-memory stores, served on a Unix socket (module docstring). ``start()`` returns
    the socket's path; ``close()`` stops serving and removes the directory."""

    def __init__(self, directory: str | None = None):
        self._own = directory is None
        self.directory = directory or tempfile.mkdtemp(prefix="robustgate-store-")  # mode 0700
        self.path = str(Path(self.directory) / "store.sock")
        self._stores: dict[int, HistoryStore] = {}
        self._by_namespace: dict[str, int] = {}
        self._by_stage: dict[str, int] = {}
        self._next = 1
        self._lock = threading.Lock()
        self._server: socketserver.ThreadingUnixStreamServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> str:
        service = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                service._serve(self.request)

        if os.path.exists(self.path):
            os.unlink(self.path)
        self._server = socketserver.ThreadingUnixStreamServer(self.path, Handler)
        self._server.daemon_threads = True
        os.chmod(self.path, 0o600)
        self._thread = threading.Thread(target=self._server.serve_forever, name="robustgate-store", daemon=True)
        self._thread.start()
        return self.path

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None
        if self._own:
            shutil.rmtree(self.directory, ignore_errors=True)

    def store(self, sid: int) -> HistoryStore:
        with self._lock:
            store = self._stores.get(sid)
        if store is None:
            raise ValueError(f"store {sid} was replaced (a reload changed its stage's store or encoder); reload")
        return store

    def _serve(self, sock: socket.socket) -> None:
        while True:
            try:
                header, arrays = read_frame(sock)
            except (ConnectionError, OSError):
                return
            except ValueError as exc:  # a malformed frame: say so and drop the connection
                try:
                    sock.sendall(pack({"error": str(exc)}))
                except OSError:
                    pass
                return
            try:
                reply, out = self.call(header, arrays)
            except Exception as exc:  # noqa: BLE001 - every failure is the caller's error, never the service's end
                reply, out = {"error": f"{type(exc).__name__}: {exc}"}, []
            try:
                sock.sendall(pack(reply, out))
            except OSError:
                return

    def open(self, namespace: dict[str, Any]) -> int:
        """The id of ``namespace``'s store, created on its first ``open`` (module docstring)."""
        from robustgate.defenses.stateful.store import store_for

        key = json.dumps(namespace, sort_keys=True)
        with self._lock:
            sid = self._by_namespace.get(key)
            if sid is not None:
                return sid
            store = store_for(namespace["method"], dict(namespace["spec"]), namespace.get("top_k", 20))
            sid, self._next = self._next, self._next + 1
            old = self._by_stage.get(namespace["stage"])
            if old is not None:  # the stage's store or encoder changed: its old history means nothing now
                log.warning("stateful store of stage %s replaced (%s); the new one starts empty",
                            namespace["stage"], key)
                self._stores.pop(old, None)
                self._by_namespace = {k: v for k, v in self._by_namespace.items() if v != old}
            self._stores[sid] = store
            self._by_namespace[key] = sid
            self._by_stage[namespace["stage"]] = sid
            return sid

    def call(self, header: dict[str, Any], arrays: list[np.ndarray]) -> tuple[dict[str, Any], list[np.ndarray]]:
        """One operation (module docstring) -> the reply's header and arrays."""
        op = header.get("op")
        if op == "open":
            sid = self.open(header["namespace"])
            store = self.store(sid)
            return {"store": sid, "key": store.fingerprint_key().hex(),
                    "bounds": {"max_entries": store.max_entries, "max_per_client": store.max_per_client,
                               "max_clients": store.max_clients, "ttl_s": store.ttl_s}}, []
        store = self.store(int(header["store"]))
        now = header.get("now")
        if op in ("observe", "observe_unblocked"):
            clients, sizes = header["clients"], header["sizes"]
            digests, data = arrays
            groups = list(zip(clients, _split(digests, sizes), _split(data, sizes)))
            kwargs = header.get("kwargs", {})
            if set(kwargs) - {"k", "window"}:
                raise ValueError(f"{op} takes k and window, got {sorted(kwargs)}")
            if op == "observe":
                reply, out = {}, store.observe_batch(groups, now=now, **kwargs)
            else:  # the block check and the observation of a pipeline batch, in one round trip
                ends, got = store.observe_unblocked(groups, now, **kwargs)
                reply, out = {"until": ends}, [g for g in got if g is not None]
            return reply, [np.concatenate(out) if out else np.zeros((0,), dtype=np.float32)]
        if op == "blocked":
            return {"until": store.blocked_many(header["clients"], now)}, []
        if op == "detect":
            window = header.get("window")
            return {"count": store.add_detections(header["client"], int(header["n"]), now,
                                                  None if window is None else int(window))}, []
        if op == "block":
            store.block(header["client"], float(header["until"]))
            return {}, []
        if op == "stats":
            return {"stats": store.stats()}, []
        if op == "clear":
            store.clear()
            return {}, []
        raise ValueError(f"unknown operation {op!r}")


# ---- the client (each worker's) --------------------------------------------------------------------

class RemoteStore(HistoryStore):
    """A store held by the replica's :class:`StoreService` at ``path``, for ``namespace`` (``stage``,
    ``method``, ``origin``, ``spec``, ``top_k``): the same calls and results as the store itself.
    ``holds``: what a query is remembered as (``embeddings`` for k-NN, ``hashes`` for Blacklight)."""

    backend = "memory"

    def __init__(self, path: str, namespace: dict[str, Any], timeout_s: float = 10.0):
        self.path, self.namespace, self.timeout_s = path, dict(namespace), float(timeout_s)
        self.holds = "embeddings" if namespace["method"] == "knn" else "hashes"
        self._local = threading.local()
        reply, _ = self._call({"op": "open", "namespace": self.namespace})
        self.id, self._key = int(reply["store"]), bytes.fromhex(reply["key"])
        super().__init__(**reply["bounds"])

    def _socket(self) -> socket.socket:
        sock = getattr(self._local, "sock", None)
        if sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout_s)
            try:
                sock.connect(self.path)
            except OSError as exc:
                sock.close()
                raise StoreError(f"stateful store service at {self.path}: {exc}") from None
            self._local.sock = sock
        return sock

    def _call(self, header: dict[str, Any], arrays: list[np.ndarray] = (),
              timeout_s: float | None = None) -> tuple[dict[str, Any], list[np.ndarray]]:
        sock = self._socket()
        try:
            if timeout_s is not None:
                sock.settimeout(timeout_s)
            sock.sendall(pack(header, arrays))
            reply, out = read_frame(sock)
        except (OSError, ValueError) as exc:  # the connection is in an unknown state: the next call opens another
            self._local.sock = None
            sock.close()
            raise StoreError(f"stateful store service at {self.path}: {exc}") from None
        finally:
            if timeout_s is not None and self._local.sock is not None:
                sock.settimeout(self.timeout_s)
        if "error" in reply:
            raise StoreError(f"stateful store service: {reply['error']}")
        return reply, out

    def fingerprint_key(self) -> bytes:
        return self._key

    def observe(self, client: str, digests: np.ndarray, data: np.ndarray, *args, **kwargs) -> np.ndarray:
        return self.observe_batch([(client, digests, data)], *args, **kwargs)[0]

    def _bind(self, call: str, args: tuple, kwargs: dict) -> tuple[dict[str, Any], float | None]:
        """The store's own arguments of an observation (k-NN's ``k, now, window``, Blacklight's ``now``)
        -> (those but ``now``, ``now``)."""
        names = ("k", "now", "window") if self.holds == "embeddings" else ("now",)
        if len(args) > len(names) or set(kwargs) - set(names):
            raise TypeError(f"{call} takes (groups, {', '.join(names)})")
        bound = {**dict(zip(names, args)), **kwargs}
        now = bound.pop("now", None)
        if "k" in names and "k" not in bound:
            raise TypeError(f"{call} needs k")
        return bound, now

    def _observe(self, op: str, groups: list[tuple[str, np.ndarray, np.ndarray]], bound: dict[str, Any],
                 now: float | None) -> tuple[dict[str, Any], np.ndarray, list[int]]:
        """One observing call of the service: its reply, the rows it answered and the groups' sizes."""
        sizes = [int(d.shape[0]) for _, d, _ in groups]
        digests = np.concatenate([np.asarray(d, dtype=np.uint64) for _, d, _ in groups])
        data = np.concatenate([np.asarray(x) for _, _, x in groups])
        if data.dtype != np.uint64:
            data = data.astype(np.float32, copy=False)
        reply, (out,) = self._call({"op": op, "store": self.id, "clients": [c for c, _, _ in groups],
                                    "sizes": sizes, "kwargs": bound, "now": now}, [digests, data])
        return reply, out, sizes

    def observe_batch(self, groups: list[tuple[str, np.ndarray, np.ndarray]], *args, **kwargs) -> list[np.ndarray]:
        """The store's ``observe_batch`` in one call: k-NN's ``(groups, k, now=None, window=None)``,
        Blacklight's ``(groups, now=None)``."""
        bound, now = self._bind("observe_batch", args, kwargs)
        if not groups:
            return []
        _, out, sizes = self._observe("observe", groups, bound, now)
        return _split(out, sizes)

    def observe_unblocked(self, groups: list[tuple[str, np.ndarray, np.ndarray]], now: float | None = None,
                          **kwargs) -> tuple[list[float | None], list[np.ndarray | None]]:
        """The store's ``observe_unblocked`` (the block check and the observation of a pipeline batch)
        in one round trip."""
        bound, _ = self._bind("observe_unblocked", (), kwargs)
        if not groups:
            return [], []
        reply, out, sizes = self._observe("observe_unblocked", groups, bound, now)
        ends = reply["until"]
        live = iter(_split(out, [size for size, end in zip(sizes, ends) if end is None]))
        return ends, [next(live) if end is None else None for end in ends]

    def blocked_many(self, clients: list[str], now: float | None = None) -> list[float | None]:
        return self._call({"op": "blocked", "store": self.id, "clients": list(clients), "now": now})[0]["until"]

    def blocked_until(self, client: str, now: float | None = None) -> float | None:
        return self.blocked_many([client], now)[0]

    def add_detections(self, client: str, n: int, now: float | None = None, window: int | None = None) -> int:
        reply, _ = self._call({"op": "detect", "store": self.id, "client": client, "n": int(n), "now": now,
                               "window": window})
        return int(reply["count"])

    def block(self, client: str, until: float) -> None:
        self._call({"op": "block", "store": self.id, "client": client, "until": float(until)})

    def stats(self) -> dict[str, int]:
        # asked once a second by each worker's metrics reader thread (proxy/metrics.py StoreStats): never long
        reply, _ = self._call({"op": "stats", "store": self.id}, timeout_s=STATS_TIMEOUT_S)
        return {k: int(v) for k, v in reply["stats"].items()}

    def clear(self) -> None:
        self._call({"op": "clear", "store": self.id})
