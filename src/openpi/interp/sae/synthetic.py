"""Synthetic data with planted answers, for tests and benchmarks of the SAE tools.

* `planted_dictionary`: rows = sparse non-negative combinations of known unit atoms + a large mean + noise.
* `planted_rollouts`: a rollout folder (episode records with chunks and attempts, frames) plus activation rows
  with their key columns (as export_activations.py writes them, `action_index` included) whose activations are
  built from orthonormal atoms with planted behaviour: atom 0 of action token j follows the x of the chunk action
  that token predicts (relu(2 * chunk_t[j, x])), atom 1 fires only in task 1, atom 2 fires at env step
  `event_step` of every episode (decaying over a few steps), the other atoms fire at random.
"""

from __future__ import annotations

import pathlib

import numpy as np

from openpi.interp.sae import model as sae_model
from openpi.shared.records import KEY_COLUMNS, EpisodeKey, EpisodeRecord


def planted_dictionary(d: int = 48, n_atoms: int = 96, rows: int = 20000, active: int = 4, seed: int = 0,
                       offset: float = 3.0, noise: float = 0.01, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """(X (rows, d) float32, atoms (n_atoms, d) unit rows): each row mixes `active` distinct random atoms with
    coefficients in [0.5, 2], plus a shared random mean of norm ~offset*sqrt(d) and Gaussian noise.

    Built ``chunk`` rows at a time with work and memory linear in rows * active * d (not rows * n_atoms), so
    research-scale matrices (65,536 latents, d=2048) take seconds."""
    if active > n_atoms:
        raise ValueError(f"active={active} atoms per row, but only n_atoms={n_atoms}")
    rng = np.random.default_rng(seed)
    atoms = rng.normal(size=(n_atoms, d))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    atoms32 = atoms.astype(np.float32)
    mean = (rng.normal(size=d) * offset).astype(np.float32)
    x = np.empty((rows, d), np.float32)
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        idx = _distinct_indices(rng, n, active, n_atoms)
        coef = rng.uniform(0.5, 2.0, size=(n, active)).astype(np.float32)
        x[start:start + n] = np.einsum("ra,rad->rd", coef, atoms32[idx]) + mean
        x[start:start + n] += noise * rng.standard_normal((n, d), dtype=np.float32)
    return x, atoms


def _distinct_indices(rng: np.random.Generator, rows: int, active: int, n: int) -> np.ndarray:
    """(rows, active) indices in [0, n), distinct within each row: uniform draws, rows with a repeat redrawn."""
    idx = rng.integers(0, n, (rows, active))
    while True:
        srt = np.sort(idx, axis=1)
        bad = np.nonzero((srt[:, 1:] == srt[:, :-1]).any(axis=1))[0]
        if bad.size == 0:
            return idx
        idx[bad] = rng.integers(0, n, (bad.size, active))


def orthonormal_atoms(n_atoms: int, d: int, seed: int = 0) -> np.ndarray:
    """(n_atoms, d) orthonormal rows (n_atoms <= d)."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, n_atoms)))
    return q.T.astype(np.float32)


def exact_sae(atoms: np.ndarray, k: int, arch: str = "topk", threshold: float = 0.05) -> sae_model.SparseAutoencoder:
    """An SAE whose encoder and decoder are the given orthonormal atoms (it recovers their codes exactly)."""
    n, d = atoms.shape
    params = {"W_enc": atoms.T.copy(), "b_enc": np.zeros(n, np.float32), "W_dec": atoms.copy(), "b_dec": np.zeros(d, np.float32)}
    spec = sae_model.SAESpec(d_in=d, d_sae=n, arch=arch, k=k)
    return sae_model.SparseAutoencoder(spec, params, None if arch == "topk" else np.full(n, threshold, np.float32))


def planted_rollouts(
    root: str | pathlib.Path,
    n_episodes: int = 12,
    steps: int = 40,
    d: int = 32,
    n_atoms: int = 16,
    tokens: int = 2,
    event_step: int = 15,
    frame_size: int = 16,
    seed: int = 0,
) -> dict:
    """Write `root/activations.npy`, `root/keys.npz`, `root/episodes/*.json`, `root/frames/*.npz`.

    The policy is queried at every step and returns a chunk of `tokens` actions: action j of the chunk at t is the
    executed action of step t + j (the last one repeated past the end), so the executed action of step t is chunk
    action 0. Rows are ordered randomly (so nothing may rely on row order). Frames encode (episode, env_step) in
    their pixels: red = episode index, green = env step. Returns paths, atoms, codes and per-row ground truth.
    """
    root = pathlib.Path(root)
    (root / "episodes").mkdir(parents=True, exist_ok=True)
    (root / "frames").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    atoms = orthonormal_atoms(n_atoms, d, seed)
    prompts = {0: "pick up the bowl", 1: "open the drawer", 2: "turn on the stove"}
    cols: dict[str, list] = {c: [] for c in [*KEY_COLUMNS, "action_index"]}
    codes_list, x_list = [], []
    for e in range(n_episodes):
        key = EpisodeKey("runA", "libero_spatial" if e % 2 == 0 else "libero_goal", e % 3, e)
        attempt = f"attempt-{e}"
        t = np.arange(steps)
        phase = rng.uniform(0, 2 * np.pi, size=7)
        acts = 0.8 * np.sin(t[:, None] / 5.0 + phase[None, :])
        acts[:, 6] = np.where(np.sin(t / 7.0 + phase[6]) > 0, 1.0, -1.0)
        chunks = np.stack([acts[np.minimum(t + j, steps - 1)] for j in range(tokens)], axis=1)  # (steps, tokens, 7)
        rec = EpisodeRecord(key=key, attempt=attempt, success=bool(e % 4 != 0), status="complete", steps=steps,
                            actions=acts, states=np.zeros((steps, 8)), chunks=[], prompt=prompts[key.task_id],
                            original_prompt=prompts[key.task_id],
                            raw={"seed": seed, "init_state_index": e, "failure_reason": None})
        rec = EpisodeRecord.from_json(rec.to_json() | {"chunks": [
            {"env_step": int(s), "replan_index": int(s), "actions": chunks[s].tolist()} for s in t]})
        rec.write(root / "episodes" / f"{key.stem}.json")
        img = np.zeros((steps, frame_size, frame_size, 3), np.uint8)
        img[..., 0] = e
        img[..., 1] = t[:, None, None]
        np.savez(root / "frames" / f"{key.stem}.npz", agentview=img, wrist=img[..., ::-1].copy(), env_step=t,
                 agentview_seg=np.zeros((steps, frame_size, frame_size), np.int32),
                 wrist_seg=np.zeros((steps, frame_size, frame_size), np.int32))
        for tok in range(tokens):
            c = np.zeros((steps, n_atoms), np.float32)
            c[:, 0] = np.maximum(0.0, 2.0 * chunks[:, tok, 0])
            if key.task_id == 1:
                c[:, 1] = 1.0 + 0.1 * tok
            c[:, 2] = np.where(t >= event_step, 3.0 * np.exp(-(t - event_step) / 1.5), 0.0) * (1.0 + 0.05 * e)
            rnd = rng.random((steps, n_atoms - 3)) < 0.15
            c[:, 3:] = rnd * rng.uniform(0.3, 1.0, size=rnd.shape)
            codes_list.append(c)
            x_list.append(c @ atoms + 0.001 * rng.normal(size=(steps, d)))
            for name, val in (("run_id", key.run_id), ("suite", key.suite), ("task_id", key.task_id),
                              ("episode", e), ("attempt", attempt), ("denoise_step", 9), ("span", "actions"),
                              ("token_index", ACTIONS_START + tok), ("action_index", tok), ("span_table", 0)):
                cols[name].extend([val] * steps)
            cols["env_step"].extend(t.tolist())
            cols["replan_index"].extend(t.tolist())
    codes = np.concatenate(codes_list)
    x = np.concatenate(x_list).astype(np.float32)
    perm = rng.permutation(x.shape[0])
    keys = {c: np.asarray(v)[perm] for c, v in cols.items()}
    np.save(root / "activations.npy", x[perm])
    np.savez(root / "keys.npz", **keys)
    return {"activations": root / "activations.npy", "keys": root / "keys.npz", "rollouts": root,
            "episodes": root / "episodes", "frames": root / "frames", "atoms": atoms, "codes": codes[perm],
            "event_step": event_step}


ACTIONS_START = 785  # joint-sequence index of the first action token (Pi0 with 3 cameras and 48 prompt tokens)
