"""Our websocket client for a policy server speaking openpi's wire protocol (ours or openpi's).

Same surface as ``openpi_client.websocket_client_policy.WebsocketClientPolicy`` (``infer``, ``get_server_metadata``,
``reset``) so LIBERO code can use either, plus what that client lacks: it waits for a server that is still starting
(retrying until ``connect_timeout_s``), turns the server's text-frame error into a ``RuntimeError`` carrying the
server's message, and reconnects on the next ``infer`` after the server dropped the connection.
"""

from __future__ import annotations

import inspect
import logging
import time
from typing import Any

import websockets
import websockets.sync.client

from openpi.serving import msgpack_numpy

logger = logging.getLogger(__name__)

# websockets >= 17.1 warns unless a directly used connection opts in with legacy=True; older versions lack the flag.
_DIRECT_CONNECT = {"legacy": True} if "legacy" in inspect.signature(websockets.sync.client.connect).parameters else {}


class WebsocketClientPolicy:
    """Policy proxy: ``infer(obs)`` sends the observation to the server and returns its reply dict."""

    def __init__(
        self,
        host: str = "0.0.0.0",
        port: int | None = 8000,
        *,
        connect_timeout_s: float = 300.0,
        retry_interval_s: float = 0.5,
        infer_timeout_s: float | None = None,
    ) -> None:
        """``host`` may be a full ``ws://`` URI (then ``port`` may be None); ``infer_timeout_s`` None waits forever."""
        uri = host if host.startswith(("ws://", "wss://")) else f"ws://{host}"
        self._uri = uri if port is None else f"{uri}:{port}"
        self._connect_timeout_s = connect_timeout_s
        self._retry_interval_s = retry_interval_s
        self._infer_timeout_s = infer_timeout_s
        self._packer = msgpack_numpy.Packer()
        self._ws: websockets.sync.client.ClientConnection | None = None
        self._metadata: dict[str, Any] = {}
        self._connect()

    @property
    def uri(self) -> str:
        return self._uri

    def get_server_metadata(self) -> dict[str, Any]:
        """The metadata map the server sent when this client (re)connected."""
        return self._metadata

    def _connect(self) -> None:
        deadline = time.monotonic() + self._connect_timeout_s
        next_log = time.monotonic()
        attempts = 0
        while True:
            attempts += 1
            try:
                ws = websockets.sync.client.connect(
                    self._uri, compression=None, max_size=None,
                    open_timeout=max(1.0, min(10.0, deadline - time.monotonic())), **_DIRECT_CONNECT,
                )
                break
            except (OSError, TimeoutError, websockets.InvalidHandshake) as exc:
                now = time.monotonic()
                if now >= deadline:
                    raise RuntimeError(
                        f"no policy server reachable at {self._uri} after {self._connect_timeout_s:.1f} s "
                        f"({attempts} attempt(s)); last error: {type(exc).__name__}: {exc}"
                    ) from exc
                if now >= next_log:
                    logger.info("waiting for policy server at %s (%s)", self._uri, type(exc).__name__)
                    next_log = now + 10.0
                time.sleep(min(self._retry_interval_s, max(0.0, deadline - now)))
        try:
            first = ws.recv(timeout=max(1.0, deadline - time.monotonic()))
        except (websockets.ConnectionClosed, TimeoutError) as exc:
            ws.close()
            raise RuntimeError(f"policy server at {self._uri} sent no metadata after connecting: {exc}") from exc
        if isinstance(first, str):
            ws.close()
            raise RuntimeError(f"policy server at {self._uri} reported an error instead of metadata:\n{first}")
        self._metadata = msgpack_numpy.unpackb(first)
        self._ws = ws

    def infer(self, obs: dict) -> dict:
        """Send one observation, return the server's reply (``actions``, ``policy_timing``, ``server_timing``...)."""
        if self._ws is None:
            self._connect()
        assert self._ws is not None
        data = self._packer.pack(obs)
        try:
            self._ws.send(data)
            response = self._ws.recv(timeout=self._infer_timeout_s)
        except TimeoutError as exc:
            self._drop()
            raise RuntimeError(f"policy server at {self._uri} did not answer within {self._infer_timeout_s} s") from exc
        except websockets.ConnectionClosed as exc:
            self._drop()
            raise RuntimeError(
                f"policy server at {self._uri} closed the connection (code {exc.rcvd.code if exc.rcvd else None}, "
                f"reason {exc.rcvd.reason if exc.rcvd else ''!r}) before answering"
            ) from exc
        if isinstance(response, str):
            # The protocol's error signal: a text frame with the message, then close code 1011.
            self._drop()
            raise RuntimeError(f"policy server error: {response}")
        return msgpack_numpy.unpackb(response)

    def reset(self) -> None:
        """Nothing to reset client-side (kept for openpi's BasePolicy surface)."""

    def _drop(self) -> None:
        if self._ws is not None:
            self._ws.close()
            self._ws = None

    def close(self) -> None:
        self._drop()

    def __enter__(self) -> WebsocketClientPolicy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
