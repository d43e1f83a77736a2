"""Batched serving: concurrent requests answered in one model call give each client what it would get alone."""
import threading

import numpy as np
import pytest

from openpi.interp.store import ActivationStore
from openpi.policies.libero_policy import example_observation
from openpi.policies.policy_config import create_policy
from openpi.serving.websocket_client import WebsocketClientPolicy
from openpi.serving.websocket_server import LIBERO_REQUIRED_KEYS, BackgroundServer

SITE = "llm.expert1.layer.1.resid_post"


def _obs(i: int) -> dict:
    return example_observation(seed=i) | {"meta/run_id": "b", "meta/env_step": 5 * i, "meta/replan_index": i}


@pytest.fixture(scope="module")
def policy():
    return create_policy()


def test_infer_batch_equals_one_at_a_time(policy):
    obs = [_obs(i) for i in range(3)]
    alone = [policy.infer(o)["actions"] for o in obs]
    batched = policy.infer_batch(obs)
    diffs = [float(np.abs(b["actions"] - a).max()) for a, b in zip(alone, batched)]
    assert max(diffs) < 1e-5, diffs  # same noise (keyed by meta): only float summation order may differ
    assert all(b["policy_timing"]["batch_size"] == 3 for b in batched)


def test_a_bad_request_fails_alone(policy):
    bad = _obs(1)
    bad["observation/state"] = np.zeros(5, np.float32)
    results = policy.infer_batch([_obs(0), bad, _obs(2)])
    assert isinstance(results[1], ValueError) and "observation/state" in str(results[1])
    np.testing.assert_allclose(results[2]["actions"], policy.infer(_obs(2))["actions"], atol=1e-5)


def test_concurrent_clients_are_batched_and_recorded_per_request(tmp_path):
    policy = create_policy(record_sites=[f"{SITE}?tokens=actions&steps=-1"], record_dir=str(tmp_path / "store"))
    expected = {i: policy.infer_batch([_obs(i)])[0]["actions"] for i in range(4)}  # warms the compile, B = 1
    policy.recorder.writer.flush()
    single = ActivationStore(tmp_path / "store").read(SITE)
    replies: dict[int, dict] = {}
    with BackgroundServer(policy, required_keys=LIBERO_REQUIRED_KEYS, max_batch=4, batch_wait_ms=200) as srv:
        barrier = threading.Barrier(4)

        def client(i):
            with WebsocketClientPolicy("127.0.0.1", srv.port) as c:
                barrier.wait()
                replies[i] = c.infer(_obs(i) | {"meta/run_id": "served"})

        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    policy.close()
    assert max(r["policy_timing"]["batch_size"] for r in replies.values()) > 1  # they really were batched
    for i, r in replies.items():
        np.testing.assert_allclose(r["actions"], expected[i], atol=1e-5)
    x, keys = ActivationStore(tmp_path / "store").read(SITE, where={"run_id": "served"})
    assert sorted(set(keys["env_step"].tolist())) == [0, 5, 10, 15]  # each request keyed by its own meta
    for step in (0, 5, 10, 15):
        mine = x[(keys["env_step"] == step)]
        ref = single[0][single[1]["env_step"] == step]
        np.testing.assert_allclose(mine, ref, atol=1e-4)
