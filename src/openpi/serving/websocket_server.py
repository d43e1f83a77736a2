"""Websocket policy server speaking openpi's wire protocol, so the official ``openpi-client`` works unchanged.

Protocol (see docs/serving.md):

1. On connect the server sends ``policy.metadata`` as the first binary message (msgpack map).
2. Each request is one binary message: a msgpack map (the observation). Each reply is one binary message: the
   policy's output map plus ``server_timing`` = ``{"infer_ms", "wait_ms", "decode_ms"[, "prev_total_ms"]}``.
3. A failed request (undecodable bytes, a text frame, not a map, missing required keys, the policy raising, an
   unserialisable reply) is answered with a **text** frame holding the error message, then that connection alone
   is closed with code 1011. The error is logged; other connections are unaffected.
4. Plain HTTP ``GET /healthz`` answers 200 ``OK`` (websockets ``process_request`` hook).

Observation keys under ``meta/`` (``meta/run_id``, ``meta/episode``, ``meta/env_step`` ...) pass through to the
policy untouched. When an observation carries no ``meta/run_id`` the server adds ``meta/connection_id`` (a unique
hex id per connection) and ``meta/request_index`` (0-based count of requests on that connection) unless the client
already set them, so recordings are keyed even for clients that send no metadata.

Inference runs on one worker thread under a lock (policies are not assumed thread-safe), so the event loop keeps
answering health checks, handshakes and pings while a slow model runs. With ``max_batch > 1`` and a policy that has
``infer_batch`` (``openpi.policies.policy.Policy`` does), concurrent requests are gathered (up to ``max_batch``,
waiting at most ``batch_wait_ms`` after the first) into one batched call; each request still gets its own reply,
error and recording rows. Otherwise concurrent requests queue for the policy one at a time.
This module does not import the model code: anything with ``infer(obs) -> dict`` and ``metadata`` can be served.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import http
import ipaddress
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import websockets
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response

from openpi.serving import msgpack_numpy

logger = logging.getLogger(__name__)

CLOSE_CODE_INTERNAL_ERROR = 1011
HEALTH_PATH = "/healthz"
DEFAULT_HOST = "127.0.0.1"  # client and server share a node (the SLURM recipe); a public bind must be asked for
# Largest request accepted, in bytes. A LIBERO observation (two 256x256 uint8 images, state, prompt) is ~0.4 MB and
# a three-camera 224 px one ~0.5 MB; 32 MiB leaves room for bigger cameras while bounding one client's memory use.
DEFAULT_MAX_MESSAGE_BYTES = 32 * 1024 * 1024
MAX_ERROR_CHARS = 2000  # error replies echo the problem, never a whole oversized input
# Keys a LIBERO client always sends (the prompt may come from the server's default prompt instead).
LIBERO_REQUIRED_KEYS: tuple[str, ...] = ("observation/image", "observation/wrist_image", "observation/state")


class InferencePolicy(Protocol):
    """What the server needs from a policy (``openpi.policies.policy.Policy`` satisfies it)."""

    @property
    def metadata(self) -> Mapping[str, Any]: ...

    def infer(self, obs: dict) -> dict: ...


class BatchPolicy(InferencePolicy, Protocol):
    """A policy that can answer several observations in one call; a failed request's slot holds its exception."""

    def infer_batch(self, observations: list[dict]) -> list[dict | Exception]: ...


class RequestError(Exception):
    """A request the server rejects before or after calling the policy (bad frame, bad map, bad reply)."""


def _describe_exception(exc: BaseException) -> str:
    # str(KeyError("x")) is "'x'"; show the plain message instead.
    if isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        detail = exc.args[0]
    else:
        detail = str(exc)
    if isinstance(exc, RequestError):
        return detail
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__


def cap_text(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """``text`` cut to ``limit`` characters, saying how much was cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... [{len(text) - limit} more characters cut]"


def is_public_host(host: str) -> bool:
    """True unless ``host`` is a loopback name or address (binding it exposes the policy to the network)."""
    if host in ("localhost", ""):
        return host == ""
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True  # a hostname: assume it resolves to a reachable interface


def _health_check(connection: ServerConnection, request: Request) -> Response | None:
    """Answer ``GET /healthz`` with 200 before any websocket handshake; other paths go on to the handshake."""
    if request.path.split("?", 1)[0] == HEALTH_PATH:
        return connection.respond(http.HTTPStatus.OK, "OK\n")
    return None


class WebsocketPolicyServer:
    """Serves one policy to any number of websocket clients (openpi wire protocol)."""

    def __init__(
        self,
        policy: InferencePolicy,
        host: str = DEFAULT_HOST,
        port: int = 8000,
        metadata: Mapping[str, Any] | None = None,
        required_keys: Sequence[str] = (),
        max_message_bytes: int | None = DEFAULT_MAX_MESSAGE_BYTES,
        max_batch: int = 1,
        batch_wait_ms: float = 5.0,
    ) -> None:
        """``metadata`` overrides ``policy.metadata``; ``required_keys`` are checked before the policy is called;
        a request larger than ``max_message_bytes`` (None: no limit, as openpi's server) closes that connection
        with code 1009 (message too big) before it is decoded."""
        if max_batch < 1 or batch_wait_ms < 0:
            raise ValueError(f"need max_batch >= 1 and batch_wait_ms >= 0, got {max_batch}, {batch_wait_ms}")
        if max_batch > 1 and not callable(getattr(policy, "infer_batch", None)):
            raise TypeError(f"max_batch={max_batch} needs a policy with infer_batch(); {type(policy).__name__} has none")
        self._max_batch = max_batch
        self._batch_wait_s = batch_wait_ms / 1000
        self._queue: asyncio.Queue | None = None
        self._batcher: asyncio.Task | None = None
        if max_message_bytes is not None and max_message_bytes < 1:
            raise ValueError(f"max_message_bytes must be positive or None, got {max_message_bytes}")
        self._policy = policy
        self._host = host
        self._port = port
        self._max_message_bytes = max_message_bytes
        if is_public_host(host):
            logger.warning("binding %s: the policy server is reachable from other machines (no authentication); "
                           "use --host 127.0.0.1 unless clients run elsewhere", host or "all interfaces")
        self._metadata = dict(policy.metadata if metadata is None else metadata)
        # Fail at start-up, not on the first connection, if the metadata cannot be sent.
        self._metadata_bytes = msgpack_numpy.packb(self._metadata)
        self._required_keys = tuple(required_keys)
        self._policy_lock = threading.Lock()
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="policy-infer")
        self._server: Server | None = None

    @property
    def metadata(self) -> dict[str, Any]:
        return dict(self._metadata)

    @property
    def port(self) -> int:
        """The bound port (differs from the requested one when it was 0); the requested port before start."""
        if self._server is not None and self._server.sockets:
            return self._server.sockets[0].getsockname()[1]
        return self._port

    def infer_locked(self, obs: dict) -> tuple[dict, float, float]:
        """Run ``policy.infer`` under the policy lock; returns (result, wait_ms, infer_ms)."""
        t0 = time.perf_counter()
        with self._policy_lock:
            t1 = time.perf_counter()
            result = self._policy.infer(obs)
            t2 = time.perf_counter()
        return result, (t1 - t0) * 1e3, (t2 - t1) * 1e3

    def infer_batch_locked(self, observations: list[dict]) -> tuple[list[dict | Exception], float]:
        """Run ``policy.infer_batch`` under the policy lock; returns (per-request results, infer_ms)."""
        with self._policy_lock:
            t0 = time.perf_counter()
            results = self._policy.infer_batch(observations)
            return results, (time.perf_counter() - t0) * 1e3

    async def _gather_batches(self) -> None:
        """Take the first queued request, wait up to ``batch_wait_ms`` for more (up to ``max_batch``), answer all."""
        loop = asyncio.get_running_loop()
        assert self._queue is not None
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self._batch_wait_s
            while len(batch) < self._max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), timeout))
                except TimeoutError:
                    break
            started = time.perf_counter()
            try:
                results, infer_ms = await loop.run_in_executor(self._executor, self.infer_batch_locked,
                                                               [obs for obs, _, _ in batch])
                if len(results) != len(batch):
                    raise RequestError(f"infer_batch returned {len(results)} results for {len(batch)} requests")
            except Exception as exc:  # noqa: BLE001 - the whole call failed: every request in it gets the error
                results, infer_ms = [exc] * len(batch), 0.0
            for (_, fut, queued), res in zip(batch, results):
                if fut.done():
                    continue
                if isinstance(res, BaseException):
                    fut.set_exception(res)
                else:
                    fut.set_result((res, (started - queued) * 1e3, infer_ms))

    async def _infer(self, obs: dict) -> tuple[dict, float, float]:
        """(result, wait_ms, infer_ms) for one request, batched with concurrent ones when configured."""
        loop = asyncio.get_running_loop()
        if self._max_batch == 1:
            return await loop.run_in_executor(self._executor, self.infer_locked, obs)
        fut = loop.create_future()
        await self._queue.put((obs, fut, time.perf_counter()))
        return await fut

    async def start(self) -> Server:
        """Bind and start accepting connections on the running event loop."""
        if self._max_batch > 1:
            self._queue = asyncio.Queue()
            self._batcher = asyncio.get_running_loop().create_task(self._gather_batches())
        self._server = await serve(
            self._handle_connection,
            self._host,
            self._port,
            compression=None,
            max_size=self._max_message_bytes,
            process_request=_health_check,
        )
        logger.info("policy server listening on ws://%s:%d (health: http://%s:%d%s)",
                    self._host, self.port, self._host, self.port, HEALTH_PATH)
        return self._server

    async def run(self) -> None:
        """Start and serve until cancelled."""
        server = await self.start()
        try:
            await server.serve_forever()
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        if self._batcher is not None:
            self._batcher.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def serve_forever(self) -> None:
        """Blocking entry point for scripts (Ctrl-C stops it)."""
        try:
            asyncio.run(self.run())
        except KeyboardInterrupt:
            logger.info("policy server stopped")

    # ---------------------------------------------------------------- per connection

    async def _handle_connection(self, websocket: ServerConnection) -> None:
        connection_id = websocket.id.hex
        peer = websocket.remote_address
        logger.info("connection %s opened from %s", connection_id, peer)
        try:
            await websocket.send(self._metadata_bytes)
        except websockets.ConnectionClosed:
            logger.info("connection %s closed before the metadata was sent", connection_id)
            return
        request_index = 0
        prev_total_ms: float | None = None
        while True:
            try:
                message = await websocket.recv()
            except websockets.ConnectionClosed:
                logger.info("connection %s closed after %d request(s)", connection_id, request_index)
                return
            t_start = time.perf_counter()
            try:
                obs = self._decode_request(message)
                if "meta/run_id" not in obs:
                    obs.setdefault("meta/connection_id", connection_id)
                    obs.setdefault("meta/request_index", request_index)
                t_decoded = time.perf_counter()
                result, wait_ms, infer_ms = await self._infer(obs)
                reply = self._build_reply(result)
                reply["server_timing"] = {
                    "infer_ms": infer_ms,
                    "wait_ms": wait_ms,
                    "decode_ms": (t_decoded - t_start) * 1e3,
                }
                if prev_total_ms is not None:
                    reply["server_timing"]["prev_total_ms"] = prev_total_ms
                payload = msgpack_numpy.packb(reply)
            except Exception as exc:  # noqa: BLE001 - every failure is reported to this client only
                await self._fail(websocket, connection_id, request_index, exc)
                return
            try:
                await websocket.send(payload)
            except websockets.ConnectionClosed:
                logger.info("connection %s closed before reply %d was sent", connection_id, request_index)
                return
            prev_total_ms = (time.perf_counter() - t_start) * 1e3
            request_index += 1

    def _decode_request(self, message: str | bytes) -> dict:
        if isinstance(message, str):
            raise RequestError(
                f"expected a binary frame holding a msgpack map, got a text frame ({len(message)} characters)"
            )
        obs = msgpack_numpy.unpackb(message)
        if not isinstance(obs, dict):
            raise RequestError(f"expected the request to be a msgpack map (observation dict), got {type(obs).__name__}")
        bad_keys = [k for k in obs if not isinstance(k, str)]
        if bad_keys:
            raise RequestError(f"observation keys must be strings, got {bad_keys[:5]!r}")
        missing = [k for k in self._required_keys if k not in obs]
        if missing:
            raise RequestError(
                f"observation is missing required key(s) {missing}; expected {list(self._required_keys)}, "
                f"found {sorted(obs)}"
            )
        return obs

    @staticmethod
    def _build_reply(result: Any) -> dict:
        if not isinstance(result, Mapping):
            raise RequestError(f"policy.infer returned {type(result).__name__}, expected a dict with 'actions'")
        if "actions" not in result:
            raise RequestError(f"policy.infer returned a dict without 'actions' (keys: {sorted(result)})")
        return dict(result)

    async def _fail(self, websocket: ServerConnection, connection_id: str, request_index: int,
                    exc: Exception) -> None:
        message = cap_text(f"request {request_index} on connection {connection_id} failed: "
                           f"{_describe_exception(exc)}")
        if isinstance(exc, (RequestError, msgpack_numpy.MalformedMessageError)):
            logger.error("policy server: %s", message)
        else:
            logger.error("policy server: %s", message, exc_info=exc)
        try:
            await websocket.send(message)
            await websocket.close(code=CLOSE_CODE_INTERNAL_ERROR, reason="request failed; error text in previous frame")
        except websockets.ConnectionClosed:
            pass


class BackgroundServer:
    """Runs a :class:`WebsocketPolicyServer` on its own event loop thread (tests, benchmarks, notebooks).

    ``with BackgroundServer(policy, port=0) as srv: ... srv.port ...``; port 0 picks a free port.
    """

    def __init__(self, policy: InferencePolicy, host: str = "127.0.0.1", port: int = 0, **server_kwargs: Any) -> None:
        self.server = WebsocketPolicyServer(policy, host=host, port=port, **server_kwargs)
        self.host = host
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="policy-server", daemon=True)

    @property
    def port(self) -> int:
        return self.server.port

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            try:
                await self.server.start()
            except BaseException as exc:
                self._error = exc
                self._ready.set()
                return
            self._ready.set()
            try:
                await self._stop.wait()
            finally:
                await self.server.aclose()

        asyncio.run(main())

    def start(self, timeout_s: float = 30.0) -> BackgroundServer:
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise RuntimeError(f"policy server did not start within {timeout_s} s")
        if self._error is not None:
            raise RuntimeError(f"policy server failed to start on {self.host}:{self.server.port}: {self._error}") \
                from self._error
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout_s)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
