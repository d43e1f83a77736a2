"""Serve a policy over websocket with openpi's wire protocol (the official ``openpi-client`` works unchanged).

Same command shape as openpi's ``scripts/serve_policy.py``:

    python scripts/serve_policy.py                                   # embedded default (tiny Pi0 trained in LIBERO)
    python scripts/serve_policy.py policy:checkpoint --policy.config pi0_tiny     # same shapes as openpi's fixtures, random
    python scripts/serve_policy.py --env LIBERO --port 8000 policy:default
    python scripts/serve_policy.py policy:checkpoint --policy.config pi0_libero --policy.dir /ckpt/pi0_libero
    python scripts/serve_policy.py policy:checkpoint --policy.config pi0_fast_libero --policy.dir /ckpt/pi0_fast_libero \
        --policy.fast-tokenizer /ckpt/fast                          # Pi0-FAST (autoregressive)
    python scripts/serve_policy.py policy:checkpoint --policy.config dp_lerobot --policy.dir /ckpt/lerobot_dp  # LeRobot
                                                                    # Diffusion Policy (docs/diffusion_policy.md)
    python scripts/serve_policy.py --record-dir out/acts --record 'llm.expert1.layer.3.resid_post?tokens=actions' \
        'llm.layer.*.attn.probs?tokens=actions&reduce=heads'      # names: HOOKS.md

Health check: ``curl http://localhost:8000/healthz``. Protocol and error behaviour: docs/serving.md.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import signal
import socket
import sys
from typing import Any

import tyro

from openpi.serving.websocket_server import (DEFAULT_HOST, DEFAULT_MAX_MESSAGE_BYTES, LIBERO_REQUIRED_KEYS,
                                             WebsocketPolicyServer)


class EnvMode(enum.Enum):
    """Environment the served policy is for; decides which observation keys every request must carry."""

    LIBERO = "libero"


ENV_REQUIRED_KEYS: dict[EnvMode, tuple[str, ...]] = {EnvMode.LIBERO: LIBERO_REQUIRED_KEYS}


@dataclasses.dataclass
class Checkpoint:
    """Load a policy from a trained checkpoint."""

    config: str
    """Named config, e.g. pi0_libero, pi05_libero, pi0_fast_libero, pi0_tiny_spatial10, pi0_tiny, pi0_fast_tiny,
    dp_lerobot (a LeRobot Diffusion Policy folder; observation history kept server-side per episode)."""
    dir: str | None = None
    """Checkpoint directory (holds params/ and assets/; for dp_lerobot the LeRobot folder, required); default: the
    config's embedded checkpoint if it has one, else seeded random weights (tiny configs only)."""
    tokenizer: str | None = None
    """PaliGemma SentencePiece file (else $OPENPI_TOKENIZER or <dir>/paligemma_tokenizer.model)."""
    fast_tokenizer: str | None = None
    """Pi0-FAST configs: FAST action tokenizer folder (else $OPENPI_FAST_TOKENIZER, <dir>/fast_tokenizer, or the
    config's embedded one)."""
    temperature: float = 0.0
    """Pi0-FAST configs: sampling temperature (0: greedy, openpi's default)."""
    coefficient_count: str = "openpi"
    """Pi0-FAST configs: a generated chunk with the wrong number of DCT coefficients decodes to zeros as in openpi
    ("openpi") or is fitted ("fit": missing high frequencies 0, extra dropped); both are flagged in the reply."""


@dataclasses.dataclass
class Default:
    """The embedded default policy: pi0_tiny_spatial10, a tiny Pi0 trained on scripted demos of all ten
    libero_spatial tasks (34/100 on held-out initial states; card in src/openpi/assets/pi0_tiny_spatial10)."""


@dataclasses.dataclass
class Args:
    env: EnvMode = EnvMode.LIBERO
    """Environment the policy serves."""
    default_prompt: str | None = None
    """Prompt used when a request carries none."""
    host: str = DEFAULT_HOST
    """Interface to bind; 0.0.0.0 exposes the server to the network (a warning is logged)."""
    port: int = 8000
    max_batch: int = 1
    """Gather up to this many concurrent requests (several clients) into one batched model call."""
    batch_wait_ms: float = 5.0
    """With --max-batch > 1: how long the first request of a batch waits for others."""
    max_message_mb: float = DEFAULT_MAX_MESSAGE_BYTES / 2**20
    """Largest request accepted (MiB); a bigger one closes that connection with code 1009. 0 = no limit."""
    record_dir: str | None = None
    """Directory for the activation store; recording is off without it."""
    record: tuple[str, ...] = ()
    """Hook points to record, one-line form SITE?tokens=..&steps=..&reduce=.. (e.g. llm.expert1.layer.3.resid_post;
    names in HOOKS.md); needs --record-dir. A name matching no hook point is an error at start-up."""
    compact_prefix: bool = False
    """Pi0/Pi0.5: drop masked cameras and prompt padding that no --record site selects before the transformer
    (faster; the same actions within float rounding, recordings in the full layout; docs/serving.md)."""
    writer_id: str | None = None
    """Name of this server's store shards (e.g. shard$SLURM_ARRAY_TASK_ID); default: a random id."""
    policy: Checkpoint | Default = dataclasses.field(default_factory=Default)


def policy_kwargs(args: Args) -> dict[str, Any]:
    """Keyword arguments for ``openpi.policies.policy_config.create_policy`` (kept separate to be testable)."""
    if args.record and args.record_dir is None:
        raise ValueError(f"--record {' '.join(args.record)} needs --record-dir DIR to say where activations go")
    kwargs: dict[str, Any] = {"default_prompt": args.default_prompt}
    if isinstance(args.policy, Checkpoint):
        kwargs.update(config_name=args.policy.config, checkpoint_dir=args.policy.dir)
        if args.policy.tokenizer is not None:
            kwargs["tokenizer"] = args.policy.tokenizer
        if args.policy.fast_tokenizer is not None:
            kwargs["fast_tokenizer"] = args.policy.fast_tokenizer
        if args.policy.temperature:
            kwargs["temperature"] = args.policy.temperature
        if args.policy.coefficient_count != "openpi":
            kwargs["coefficient_count"] = args.policy.coefficient_count
    if args.compact_prefix:
        kwargs["compact_prefix"] = True
    if args.record_dir is not None:
        kwargs.update(record_dir=args.record_dir, record_sites=tuple(args.record) or None)
        if args.writer_id is not None:
            kwargs["writer_id"] = args.writer_id
    return kwargs


def create_policy(args: Args) -> Any:
    # Imported here so the server (and --help) never needs the model code.
    from openpi.policies import policy_config

    return policy_config.create_policy(**policy_kwargs(args))


def _exit_on_signals() -> None:
    """SIGINT/SIGTERM end the server through the normal exit path, so buffered recordings are flushed. A server
    started in the background of a non-interactive shell inherits an *ignored* SIGINT: restore it explicitly."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))


def main(args: Args) -> None:
    _exit_on_signals()
    policy = create_policy(args)
    logging.info("serving policy on port %d of %s, metadata %s", args.port, socket.gethostname(), policy.metadata)
    max_bytes = int(args.max_message_mb * 2**20) if args.max_message_mb > 0 else None
    server = WebsocketPolicyServer(policy, host=args.host, port=args.port, required_keys=ENV_REQUIRED_KEYS[args.env],
                                   max_message_bytes=max_bytes, max_batch=args.max_batch,
                                   batch_wait_ms=args.batch_wait_ms)
    try:
        server.serve_forever()
    finally:
        policy.close()  # flush recordings still buffered


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    main(tyro.cli(Args))
