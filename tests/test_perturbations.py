"""Perturbations: each mode does what it says, is deterministic by seed, and describes itself as JSON."""

import json

import numpy as np
import pytest

from openpi.envs import perturbations as pert

PROMPT = "turn on the stove and put the black bowl on top of the left plate"
OTHERS = ["open the top drawer of the cabinet", PROMPT, "push the plate to the front of the stove"]


@pytest.mark.parametrize("mode", pert.PROMPT_MODES)
def test_prompt_modes_deterministic_and_jsonable(mode):
    kw = {"other_prompts": OTHERS, "custom": "do a dance"}
    a = pert.perturb_prompt(PROMPT, mode, pert.derive_rng(7, "libero_goal", 1, 2, "prompt"), **kw)
    b = pert.perturb_prompt(PROMPT, mode, pert.derive_rng(7, "libero_goal", 1, 2, "prompt"), **kw)
    assert a == b
    new, info = a
    assert json.loads(json.dumps(info)) == info
    assert info["mode"] == mode and info["original"] == PROMPT and info["prompt"] == new
    assert info["changed"] == (new != PROMPT)


def test_prompt_mode_semantics():
    rng = lambda s=0: pert.derive_rng(s, "x")  # noqa: E731
    assert pert.perturb_prompt(PROMPT, "original", rng())[0] == PROMPT
    assert pert.perturb_prompt(PROMPT, "empty", rng())[0] == ""
    assert pert.perturb_prompt(PROMPT, "custom", rng(), custom="stop")[0] == "stop"
    shuffled, info = pert.perturb_prompt(PROMPT, "shuffle", rng())
    assert sorted(shuffled.split()) == sorted(PROMPT.split()) and shuffled != PROMPT
    assert [PROMPT.split()[i] for i in info["permutation"]] == shuffled.split()
    other, _ = pert.perturb_prompt(PROMPT, "other_task", rng(), other_prompts=OTHERS)
    assert other in OTHERS and other != PROMPT
    opposite, info = pert.perturb_prompt(PROMPT, "opposite", rng())
    assert opposite == "turn off the stove and put the black bowl under the right plate"
    assert {"from": "turn on", "to": "turn off"} in info["replacements"]
    syn, info = pert.perturb_prompt(PROMPT, "synonym", rng())
    assert syn != PROMPT and info["replacements"]
    for r in info["replacements"]:
        assert r["to"] in pert.SYNONYMS[r["from"].lower()]


def test_prompt_seed_changes_random_modes():
    outs = {pert.perturb_prompt(PROMPT, "shuffle", pert.derive_rng(s, "p"))[0] for s in range(10)}
    assert len(outs) > 5
    others = {pert.perturb_prompt(PROMPT, "other_task", pert.derive_rng(s, "p"), other_prompts=OTHERS)[0] for s in range(20)}
    assert others == {OTHERS[0], OTHERS[2]}


def test_prompt_errors():
    with pytest.raises(ValueError, match="unknown prompt mode"):
        pert.perturb_prompt(PROMPT, "reverse", pert.derive_rng(0))
    with pytest.raises(ValueError, match="custom"):
        pert.perturb_prompt(PROMPT, "custom", pert.derive_rng(0))
    with pytest.raises(ValueError, match="other task"):
        pert.perturb_prompt(PROMPT, "other_task", pert.derive_rng(0), other_prompts=[PROMPT])
    _, info = pert.perturb_prompt("pick the cup", "opposite", pert.derive_rng(0))
    assert not info["changed"] and "unchanged" in info["warning"]


def _planted():
    img = np.zeros((224, 224, 3), np.uint8)
    mask = np.zeros((224, 224), np.int32)
    img[60:120, 90:170] = (200, 50, 30)
    mask[60:120, 90:170] = 4
    img[150:200, 20:60] = (30, 220, 90)
    mask[150:200, 20:60] = 9
    return img, mask


def test_visual_translate_is_an_exact_shift():
    img, mask = _planted()
    v = pert.VisualPerturbation(0.0, (5, -7))
    out, m = v.apply(img, mask)
    # dx=5 (right), dy=-7 (up): out[y, x] = img[y + 7, x - 5]
    np.testing.assert_array_equal(out[: 224 - 7, 5:], img[7:, : 224 - 5])
    np.testing.assert_array_equal(m[: 224 - 7, 5:], mask[7:, : 224 - 5])
    assert not out[:, :5].any() and not out[224 - 7 :].any()


@pytest.mark.parametrize("angle,shift", [(15.0, (0, 0)), (-30.0, (6, 4)), (90.0, (-3, 10))])
def test_visual_rotation_keeps_mask_on_object(angle, shift):
    img, mask = _planted()
    out, m = pert.VisualPerturbation(angle, shift, ("agentview", "wrist")).apply(img, mask)
    assert out.dtype == np.uint8 and m.dtype == np.int32
    assert set(np.unique(m).tolist()) <= {0, 4, 9}
    def off_colour(sel, colour):  # fraction of selected pixels clearly not the object's colour
        return float((np.abs(out[sel].astype(float) - colour).max(axis=1) > 60).mean())

    for label, colour in ((4, (200, 50, 30)), (9, (30, 220, 90))):
        inside = m == label
        assert inside.sum() > 0.8 * (mask == label).sum()
        assert off_colour(inside, colour) < 0.05, label
        # The untransformed mask no longer fits the transformed image.
        assert off_colour(mask == label, colour) > 0.1, label


def test_visual_sampling_deterministic_and_bounded():
    draws = [pert.sample_visual(10.0, (8, 4), ("agentview",), pert.derive_rng(s, "v"), random=True) for s in range(30)]
    again = [pert.sample_visual(10.0, (8, 4), ("agentview",), pert.derive_rng(s, "v"), random=True) for s in range(30)]
    assert draws == again
    assert all(abs(d.rotate_deg) <= 10 and abs(d.translate_px[0]) <= 8 and abs(d.translate_px[1]) <= 4 for d in draws)
    assert len({d.rotate_deg for d in draws}) > 20
    fixed = pert.sample_visual(5.0, (1, 2), ("wrist",), pert.derive_rng(0), random=False)
    assert fixed == pert.VisualPerturbation(5.0, (1, 2), ("wrist",))
    assert fixed.applies_to("wrist") and not fixed.applies_to("agentview")
    with pytest.raises(ValueError, match="camera"):
        pert.VisualPerturbation(1.0, (0, 0), ("frontview",))


def test_random_actions_deterministic_and_independent_of_policy():
    def run(prob, seed, actions):
        ra = pert.RandomActionPerturbation(prob, pert.derive_rng(seed, "ra"))
        outs = [ra(a, t) for t, a in enumerate(actions)]
        return ra, outs

    acts_a = np.zeros((2000, 7))
    acts_b = np.ones((2000, 7)) * 0.3
    ra1, out1 = run(0.3, 5, acts_a)
    ra2, out2 = run(0.3, 5, acts_b)
    assert ra1.replaced_steps == ra2.replaced_steps  # which steps: independent of the policy's actions
    assert 0.25 < len(ra1.replaced_steps) / 2000 < 0.35
    for (a1, r1), (a2, r2), t in zip(out1, out2, range(2000)):
        assert r1 == r2
        if r1:
            np.testing.assert_array_equal(a1, a2)
            assert np.all(np.abs(a1[:6]) <= 1) and a1[6] in (-1.0, 1.0)
        else:
            np.testing.assert_array_equal(a1, acts_a[t])
    ra3, _ = run(0.3, 6, acts_a)
    assert ra3.replaced_steps != ra1.replaced_steps
    assert run(0.0, 5, acts_a)[0].replaced_steps == []
    assert len(run(1.0, 5, acts_a[:50])[0].replaced_steps) == 50
    assert json.loads(json.dumps(ra1.describe()))["prob"] == 0.3
    with pytest.raises(ValueError, match="probability"):
        pert.RandomActionPerturbation(1.5, pert.derive_rng(0))


def test_plan_episode_deterministic_per_episode():
    cfg = pert.PerturbationConfig(
        prompt_mode="shuffle", rotate_deg=8.0, translate_px=(4, 4), visual_random=True,
        random_action_prob=0.1, object_shift_m=0.05,
    )
    kw = dict(seed=7, suite="libero_spatial", task_id=3, prompt=PROMPT)
    p1 = pert.plan_episode(cfg, episode=4, **kw)
    p2 = pert.plan_episode(cfg, episode=4, **kw)
    p3 = pert.plan_episode(cfg, episode=5, **kw)
    assert p1.describe() == p2.describe() and p1.object_shift == p2.object_shift
    assert (p1.prompt, p1.visual, p1.object_shift) != (p3.prompt, p3.visual, p3.object_shift)
    assert all(abs(v) <= 0.05 for v in p1.object_shift[:2]) and p1.object_shift[2] == 0.0
    json.dumps(p1.describe())
    json.dumps(cfg.to_json())
    # The visual draw does not depend on which other perturbations are switched on.
    cfg2 = pert.PerturbationConfig(rotate_deg=8.0, translate_px=(4, 4), visual_random=True)
    assert pert.plan_episode(cfg2, episode=4, **kw).visual == p1.visual


def test_config_validation():
    with pytest.raises(ValueError, match="custom"):
        pert.PerturbationConfig(prompt_mode="custom").validate()
    with pytest.raises(ValueError, match="random_action_prob"):
        pert.PerturbationConfig(random_action_prob=-0.1).validate()
    with pytest.raises(ValueError, match="object_shift_m"):
        pert.PerturbationConfig(object_shift_m=-1).validate()
