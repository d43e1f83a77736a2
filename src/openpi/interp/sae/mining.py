"""Feature mining: what makes each SAE feature fire, joined to rollouts by keys (never by row order).

Two streaming passes over the activation rows (memory: a few arrays of size d_sae x small, plus a bounded
candidate pool per mined feature):

1. `feature_stats`: per latent, firing count, activation sums and max, sums against the action label of each
   row (for correlations; `MiningConfig.label`: the chunk action the row's token predicts, default, or the action
   executed at env step + that index; rule: openpi.interp.join) and per-task / per-prompt sums.
2. `top_moments`: for the chosen features, an exact top-activating *moment* list with non-max suppression,
   plus activation histograms.

A moment is (episode, env_step); its activation is the max over the rows recorded at that moment (tokens,
denoising steps). Non-max suppression, greedy by activation: a moment is kept unless its episode already has
`max_per_episode` kept moments or a kept moment of the same episode lies fewer than `min_step_gap` env steps
away. The streaming pool keeps, per feature, the top `top_n * C` moments with at most C per episode,
C = max_per_episode * max(1, 2 * min_step_gap - 1); greedy NMS over this pool equals NMS over all moments.

Report (JSON-able dict, `mine`): {"n_rows", "n_episodes", "config", "label_rule" (with rollouts),
"dropped_stale_rows", "features": [FeatureReport]}, where each
FeatureReport has
  feature, fire_count, fire_rate (fraction of rows with a non-zero code), mean_when_active, max_activation,
  top: [{rank, activation, stem, run_id, suite, task_id, episode, env_step, row (position among the selected
        rows), token_index, span, denoise_step, replan_index (those present in the keys)}],
  hist: {edges, counts (non-zero activations), zeros},
  actions (when rollout records are given): {at_top_mean (action_dim): mean executed action at the top
        moments, window_offsets, window_mean (offsets x action_dim: mean executed action at env step + offset,
        NaN where outside episodes), label (which action label `corr` uses), corr (Pearson correlation over all
        rows with a label, of the activation, zeros included, with each action dimension), corr_rows, clusters:
        {centers, sizes, labels (cluster of each top moment)}},
  tasks: [{suite, task_id, n_rows, fire_rate, mean_activation}] sorted by mean_activation (desc),
  prompts (when rollout records are given): [{prompt, n_rows, fire_rate, mean_activation}] sorted likewise.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp
import tqdm

from openpi.interp.join import LABELS
from openpi.interp.sae import data as sae_data
from openpi.shared.io import finite_floats
from openpi.shared.records import EpisodeKey, RolloutDir

SORT_KEYS = ("fire_rate", "max_activation", "mean_when_active", "action_corr")


@dataclasses.dataclass
class MiningConfig:
    top_n: int = 16
    """Top-activating moments kept per feature."""
    max_per_episode: int = 2
    """At most this many top moments from one episode."""
    min_step_gap: int = 10
    """Top moments of one episode are at least this many env steps apart."""
    window: int = 10
    """Actions from env_step - window to env_step + window are summarised around each top moment."""
    n_clusters: int = 3
    """k-means clusters of the actions at the top moments."""
    hist_bins: int = 30
    """Bins of the activation histogram (0 to the feature's max)."""
    chunk_rows: int = 4096
    """Rows encoded per chunk."""
    label: str = "predicted"
    """Action label the correlations use: predicted (the chunk action the row's token predicts) or executed (the
    action executed at env step + token index; rows whose action was never executed are left out)."""

    def __post_init__(self) -> None:
        if self.top_n < 1 or self.max_per_episode < 1 or self.min_step_gap < 0 or self.window < 0:
            raise ValueError(f"invalid mining config {self}")
        if self.label not in LABELS:
            raise ValueError(f"unknown action label {self.label!r}; choose from {list(LABELS)}")

    @property
    def per_episode_cap(self) -> int:
        return self.max_per_episode * max(1, 2 * self.min_step_gap - 1)


# ----------------------------------------------------------------------------------------------------
# Pass 1: per-latent statistics
# ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class FeatureStats:
    n_rows: int
    fire_count: np.ndarray
    sum_act: np.ndarray
    max_act: np.ndarray
    # Correlation with actions (rows with a finite action only).
    n_y: int = 0
    sum_a: np.ndarray | None = None
    sum_a2: np.ndarray | None = None
    sum_ay: np.ndarray | None = None
    sum_y: np.ndarray | None = None
    sum_y2: np.ndarray | None = None
    # Per-group (task / prompt) sums: name -> (counts (d_sae, G), sums (d_sae, G), rows per group (G,)).
    groups: dict = dataclasses.field(default_factory=dict)

    def corr(self) -> np.ndarray | None:
        """Pearson correlation (d_sae, action_dim) of each latent's activation with each action dimension."""
        if self.sum_ay is None or self.n_y < 2:
            return None
        n = self.n_y
        cov = n * self.sum_ay - np.outer(self.sum_a, self.sum_y)
        va = n * self.sum_a2 - self.sum_a**2
        vy = n * self.sum_y2 - self.sum_y**2
        den = np.sqrt(np.outer(np.maximum(va, 0), np.maximum(vy, 0)))
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 1e-12 * max(1.0, float(n) ** 2), cov / np.where(den > 0, den, 1), 0.0)


def _csr(r: np.ndarray, j: np.ndarray, v: np.ndarray, b: int, n: int) -> sp.csr_matrix:
    return sp.csr_matrix((v.astype(np.float64), (r, j)), shape=(b, n))


def feature_stats(sae, rows, y: np.ndarray | None = None, groups: dict[str, np.ndarray] | None = None, chunk: int = 4096, progress: bool = True) -> FeatureStats:
    """Pass 1 over `rows` (an `ActivationRows`): per-latent counts, sums, max, action and group sums.

    y: (rows.n, action_dim) executed action per row (NaN rows are skipped for correlations).
    groups: name -> (rows.n,) int group index per row (e.g. task, prompt).
    """
    n = sae.spec.d_sae
    st = FeatureStats(n_rows=rows.n, fire_count=np.zeros(n, np.int64), sum_act=np.zeros(n), max_act=np.zeros(n))
    if y is not None:
        a_dim = y.shape[1]
        st.sum_a, st.sum_a2 = np.zeros(n), np.zeros(n)
        st.sum_ay, st.sum_y, st.sum_y2 = np.zeros((n, a_dim)), np.zeros(a_dim), np.zeros(a_dim)
        y_ok = np.isfinite(y).all(axis=1)
    groups = groups or {}
    for name, g in groups.items():
        ng = int(g.max()) + 1 if g.size else 0
        st.groups[name] = (np.zeros((n, ng)), np.zeros((n, ng)), np.bincount(g, minlength=ng).astype(np.int64))
    for pos, x in tqdm.tqdm(rows.iterate(chunk), total=-(-rows.n // chunk), desc="feature stats", disable=not progress):
        r, j, v = sae.triples(x)
        b = len(pos)
        st.fire_count += np.bincount(j, minlength=n)
        st.sum_act += np.bincount(j, weights=v, minlength=n)
        np.maximum.at(st.max_act, j, v)
        z = _csr(r, j, v, b, n)
        if y is not None:
            ok = y_ok[pos]
            yc = np.where(ok[:, None], y[pos], 0.0)
            zt = z.T.tocsr()
            mask = sp.diags(ok.astype(np.float64))
            zo = (mask @ z).tocsc()
            st.n_y += int(ok.sum())
            st.sum_a += np.asarray(zo.sum(axis=0)).ravel()
            st.sum_a2 += np.asarray(zo.multiply(zo).sum(axis=0)).ravel()
            st.sum_ay += np.asarray(zt @ yc)
            st.sum_y += yc.sum(axis=0)
            st.sum_y2 += (yc**2).sum(axis=0)
        for name, g in groups.items():
            counts, sums, _ = st.groups[name]
            onehot = sp.csr_matrix((np.ones(b), (np.arange(b), g[pos])), shape=(b, counts.shape[1]))
            sums += np.asarray((z.T @ onehot).todense())
            counts += np.asarray(((z > 0).astype(np.float64).T @ onehot).todense())
    return st


def choose_features(st: FeatureStats, sort_by: str, num: int, features: Sequence[int] | None = None) -> np.ndarray:
    """Latent ids to mine: the given ones, or the `num` alive latents ranked by `sort_by` (descending)."""
    n = st.fire_count.size
    if features:
        f = np.asarray(list(features), np.int64)
        bad = f[(f < 0) | (f >= n)]
        if bad.size:
            raise ValueError(f"feature ids {bad.tolist()} outside the dictionary (0..{n - 1})")
        return f
    if sort_by not in SORT_KEYS:
        raise ValueError(f"unknown sort statistic {sort_by!r}; expected one of {SORT_KEYS}")
    alive = np.flatnonzero(st.fire_count > 0)
    if alive.size == 0:
        raise ValueError("no feature fires on the selected rows (empty selection or a dead SAE)")
    score = feature_score(st, sort_by)
    order = alive[np.argsort(-score[alive], kind="stable")]
    return order[:num]


def feature_score(st: FeatureStats, sort_by: str) -> np.ndarray:
    """Per-latent value of a sort statistic (see SORT_KEYS)."""
    if sort_by == "fire_rate":
        return st.fire_count / max(1, st.n_rows)
    if sort_by == "max_activation":
        return st.max_act
    if sort_by == "mean_when_active":
        return st.sum_act / np.maximum(st.fire_count, 1)
    if sort_by == "action_corr":
        c = st.corr()
        if c is None:
            raise ValueError("sorting by action_corr needs action labels (--rollouts)")
        return np.abs(c).max(axis=1)
    raise ValueError(f"unknown sort statistic {sort_by!r}; expected one of {SORT_KEYS}")


# ----------------------------------------------------------------------------------------------------
# Pass 2: top moments with non-max suppression, histograms
# ----------------------------------------------------------------------------------------------------
def _group_rank(*keys: np.ndarray) -> np.ndarray:
    """Rank of each element within its run of equal keys (arrays already sorted by those keys)."""
    n = keys[0].size
    if n == 0:
        return np.zeros(0, np.int64)
    new = np.zeros(n, bool)
    new[0] = True
    for k in keys:
        new[1:] |= k[1:] != k[:-1]
    starts = np.flatnonzero(new)
    return np.arange(n) - np.repeat(starts, np.diff(np.append(starts, n)))


class MomentPool:
    """Per-feature pool of the best moments with a per-episode cap (exact for greedy NMS, see module doc)."""

    def __init__(self, n_slots: int, pool_size: int, cap: int) -> None:
        self.pool_size, self.cap = pool_size, cap
        self.cols = {name: np.zeros(0, dt) for name, dt in (("slot", np.int64), ("moment", np.int64), ("ep", np.int64), ("val", np.float64), ("pos", np.int64))}
        self.threshold = np.full(n_slots, -np.inf)
        self._pending: list[dict] = []
        self._pending_n = 0

    def add(self, slot, moment, ep, val, pos) -> None:
        keep = val > self.threshold[slot]
        if keep.any():
            self._pending.append({"slot": slot[keep], "moment": moment[keep], "ep": ep[keep], "val": val[keep].astype(np.float64), "pos": pos[keep]})
            self._pending_n += int(keep.sum())
        if self._pending_n > max(1 << 16, 4 * self.cols["slot"].size):
            self.compact()

    def compact(self) -> None:
        if not self._pending:
            return
        c = {k: np.concatenate([self.cols[k]] + [p[k] for p in self._pending]) for k in self.cols}
        self._pending, self._pending_n = [], 0
        # 1) one entry per (feature, moment): the max over its rows.
        o = np.lexsort((-c["val"], c["moment"], c["slot"]))
        c = {k: v[o] for k, v in c.items()}
        c = {k: v[_group_rank(c["slot"], c["moment"]) == 0] for k, v in c.items()}
        # 2) at most `cap` moments per (feature, episode).
        o = np.lexsort((c["moment"], -c["val"], c["ep"], c["slot"]))
        c = {k: v[o] for k, v in c.items()}
        c = {k: v[_group_rank(c["slot"], c["ep"]) < self.cap] for k, v in c.items()}
        # 3) at most `pool_size` per feature, best first.
        o = np.lexsort((c["moment"], -c["val"], c["slot"]))
        c = {k: v[o] for k, v in c.items()}
        rank = _group_rank(c["slot"])
        c = {k: v[rank < self.pool_size] for k, v in c.items()}
        self.cols = c
        full = _group_rank(c["slot"]) == self.pool_size - 1
        self.threshold[c["slot"][full]] = c["val"][full]

    def per_slot(self) -> dict[int, dict[str, np.ndarray]]:
        self.compact()
        c = self.cols
        out = {}
        if c["slot"].size == 0:
            return out
        bounds = np.flatnonzero(np.r_[True, c["slot"][1:] != c["slot"][:-1], True])
        for a, b in zip(bounds[:-1], bounds[1:]):
            out[int(c["slot"][a])] = {k: v[a:b] for k, v in c.items()}
        return out


def nms(entries: dict[str, np.ndarray], steps: np.ndarray, cfg: MiningConfig) -> list[int]:
    """Greedy non-max suppression over entries sorted by value (desc); returns kept entry indices."""
    kept: list[int] = []
    per_ep: dict[int, list[int]] = {}
    for i in range(entries["val"].size):
        e = int(entries["ep"][i])
        s = int(steps[i])
        taken = per_ep.setdefault(e, [])
        if len(taken) >= cfg.max_per_episode or any(abs(s - t) < cfg.min_step_gap for t in taken):
            continue
        taken.append(s)
        kept.append(i)
        if len(kept) == cfg.top_n:
            break
    return kept


def top_moments(sae, rows, features: np.ndarray, max_act: np.ndarray, cfg: MiningConfig, progress: bool = True) -> tuple[dict[int, list[dict]], dict[int, dict]]:
    """Pass 2: (feature -> top moments after NMS, feature -> histogram) for the chosen `features`."""
    ep, ep_keys = sae_data.episode_ids(rows.keys)
    stems = [k.stem for k in ep_keys]
    env_step = np.asarray(rows.keys["env_step"], np.int64)
    stride = int(env_step.max() - env_step.min()) + 1
    moment_of_row = ep * stride + (env_step - env_step.min())
    n = sae.spec.d_sae
    slot_of = np.full(n, -1, np.int64)
    slot_of[features] = np.arange(features.size)
    pool = MomentPool(features.size, cfg.top_n * cfg.per_episode_cap, cfg.per_episode_cap)
    fmax = np.maximum(max_act[features], 1e-12)
    hist = np.zeros((features.size, cfg.hist_bins), np.int64)
    fires = np.zeros(features.size, np.int64)
    for pos, x in tqdm.tqdm(rows.iterate(cfg.chunk_rows), total=-(-rows.n // cfg.chunk_rows), desc="top moments", disable=not progress):
        r, j, v = sae.triples(x)
        slot = slot_of[j]
        m = slot >= 0
        r, slot, v = r[m], slot[m], v[m].astype(np.float64)
        p = pos[r]
        pool.add(slot, moment_of_row[p], ep[p], v, p)
        b = np.minimum((v / fmax[slot] * cfg.hist_bins).astype(np.int64), cfg.hist_bins - 1)
        np.add.at(hist, (slot, b), 1)
        fires += np.bincount(slot, minlength=features.size)
    extra_cols = [c for c in ("token_index", "span", "denoise_step", "replan_index") if c in rows.keys]
    tops: dict[int, list[dict]] = {}
    for slot, entries in pool.per_slot().items():
        steps = env_step[entries["pos"]]
        kept = nms(entries, steps, cfg)
        items = []
        for rank, i in enumerate(kept):
            p = int(entries["pos"][i])
            item = {
                "rank": rank,
                "activation": float(entries["val"][i]),
                "stem": stems[int(entries["ep"][i])],
                "run_id": str(rows.keys["run_id"][p]),
                "suite": str(rows.keys["suite"][p]),
                "task_id": int(rows.keys["task_id"][p]),
                "episode": int(rows.keys["episode"][p]),
                "env_step": int(steps[i]),
                "row": p,
            }
            for c in extra_cols:
                val = rows.keys[c][p]
                item[c] = val.item() if hasattr(val, "item") else val
            items.append(item)
        tops[int(features[slot])] = items
    hists = {}
    for s, f in enumerate(features):
        edges = np.linspace(0.0, float(max_act[f]), cfg.hist_bins + 1)
        hists[int(f)] = {"edges": edges.tolist(), "counts": hist[s].tolist(), "zeros": int(rows.n - fires[s])}
    return tops, hists


# ----------------------------------------------------------------------------------------------------
# Summaries
# ----------------------------------------------------------------------------------------------------
def action_windows(tops: list[dict], rollouts: RolloutDir, window: int) -> np.ndarray:
    """(n_top, 2 * window + 1, action_dim) executed actions around each top moment (NaN outside episodes)."""
    out = []
    for t in tops:
        acts = rollouts.record(EpisodeKey.of(t)).actions
        w = np.full((2 * window + 1, acts.shape[1]), np.nan)
        for o in range(-window, window + 1):
            s = t["env_step"] + o
            if 0 <= s < acts.shape[0]:
                w[o + window] = acts[s]
        out.append(w)
    return np.asarray(out)


def kmeans_actions(points: np.ndarray, n_clusters: int, seed: int = 0) -> dict:
    """k-means of action vectors (rows with NaN dropped); {centers, sizes, labels (-1 for dropped rows)}."""
    from sklearn.cluster import KMeans

    ok = np.isfinite(points).all(axis=1)
    labels = np.full(points.shape[0], -1)
    k = min(n_clusters, int(ok.sum()))
    if k < 1:
        return {"centers": [], "sizes": [], "labels": labels.tolist()}
    km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(points[ok])
    labels[ok] = km.labels_
    return {"centers": km.cluster_centers_.tolist(), "sizes": np.bincount(km.labels_, minlength=k).tolist(), "labels": labels.tolist()}


def action_summary(tops: list[dict], rollouts: RolloutDir, corr_row: np.ndarray | None, n_y: int, cfg: MiningConfig) -> dict:
    """Actions around a feature's top moments: mean executed action at the moment, mean window, correlation of the
    activation with the rows' action label, clusters."""
    win = action_windows(tops, rollouts, cfg.window)
    at = win[:, cfg.window] if len(tops) else np.zeros((0, 0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns (moments at episode edges)
        at_mean = np.nanmean(at, axis=0) if at.size else np.zeros(0)
        win_mean = np.nanmean(win, axis=0) if win.size else np.zeros((0, 0))
    return {
        "at_top_mean": finite_floats(at_mean),
        "window_offsets": list(range(-cfg.window, cfg.window + 1)),
        "window_mean": finite_floats(win_mean),
        "label": cfg.label,
        "corr": None if corr_row is None else corr_row.tolist(),
        "corr_rows": n_y,
        "clusters": kmeans_actions(at, cfg.n_clusters) if at.size else {"centers": [], "sizes": [], "labels": []},
    }


def group_table(st: FeatureStats, name: str, f: int, labels: Sequence[dict]) -> list[dict]:
    """Per-group rows for latent f, sorted by mean activation (desc): label fields + n_rows, fire_rate, mean."""
    counts, sums, rows_per = st.groups[name]
    out = []
    for g, lab in enumerate(labels):
        nr = int(rows_per[g])
        if nr == 0:
            continue
        out.append({**lab, "n_rows": nr, "fire_rate": float(counts[f, g] / nr), "mean_activation": float(sums[f, g] / nr)})
    out.sort(key=lambda d: -d["mean_activation"])
    return out


def task_groups(keys: dict[str, np.ndarray]) -> tuple[np.ndarray, list[dict]]:
    """Group index per row by (suite, task_id) and the labels of the groups."""
    suite = np.asarray(keys["suite"]).astype(str)
    task = np.asarray(keys["task_id"]).astype(np.int64)
    pairs, g = np.unique(np.stack([suite, task.astype(str)], axis=1), axis=0, return_inverse=True)
    return g.reshape(-1), [{"suite": str(s), "task_id": int(t)} for s, t in pairs]


def prompt_groups(ep: np.ndarray, ep_keys: Sequence[EpisodeKey], rollouts: RolloutDir) -> tuple[np.ndarray, list[dict]]:
    """Group index per row by the episode's prompt (from its rollout record)."""
    prompts = [rollouts.record(k).prompt for k in ep_keys]
    uniq, inv = np.unique(np.asarray(prompts, dtype=str), return_inverse=True)
    return inv.reshape(-1)[ep], [{"prompt": str(p)} for p in uniq]


# ----------------------------------------------------------------------------------------------------
# Orchestration
# ----------------------------------------------------------------------------------------------------
def mine(
    sae,
    rows,
    cfg: MiningConfig,
    features: Sequence[int] | None = None,
    sort_by: str = "fire_rate",
    num_features: int = 64,
    progress: bool = True,
) -> dict:
    """Full mining report (see module docstring) for the chosen features of `sae` over `rows`; actions and prompts
    come from `rows.rollouts` when the rows were opened with a rollout folder."""
    if rows.n == 0:
        raise ValueError("empty selection: no activation rows to mine")
    if rows.d != sae.spec.d_in:
        raise ValueError(f"{rows.name}: activations have d={rows.d} but the SAE expects d_in={sae.spec.d_in}")
    ep, ep_keys = sae_data.episode_ids(rows.keys)
    rollouts = getattr(rows, "rollouts", None)
    y, label_rule = None, None
    groups = {}
    g_task, task_labels = task_groups(rows.keys)
    groups["task"] = g_task
    if rollouts is not None:
        y, label_rule = sae_data.row_action_labels(rows, cfg.label)
        g_prompt, prompt_labels = prompt_groups(ep, ep_keys, rollouts)
        groups["prompt"] = g_prompt
    st = feature_stats(sae, rows, y, groups, cfg.chunk_rows, progress)
    chosen = choose_features(st, sort_by, num_features, features)
    tops, hists = top_moments(sae, rows, chosen, st.max_act, cfg, progress)
    corr = st.corr()
    out = []
    for f in chosen.tolist():
        fc = int(st.fire_count[f])
        rep = {
            "feature": f,
            "fire_count": fc,
            "fire_rate": fc / rows.n,
            "mean_when_active": float(st.sum_act[f] / fc) if fc else 0.0,
            "max_activation": float(st.max_act[f]),
            "top": tops.get(f, []),
            "hist": hists[f],
            "tasks": group_table(st, "task", f, task_labels),
        }
        if rollouts is not None:
            rep["actions"] = action_summary(rep["top"], rollouts, None if corr is None else corr[f], st.n_y, cfg)
            rep["prompts"] = group_table(st, "prompt", f, prompt_labels)
        out.append(rep)
    attempts = getattr(rows, "attempts", None)
    return {
        "n_rows": rows.n,
        "n_episodes": len(ep_keys),
        "sort_by": sort_by if not features else "given",
        "config": dataclasses.asdict(cfg),
        "label_rule": label_rule,
        "dropped_stale_rows": 0 if attempts is None else attempts.dropped,
        "features": out,
    }
