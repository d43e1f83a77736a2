"""The quickstart's stages, defined once: name, command, the report section each feeds, what each needs.

Why one list: ``scripts/quickstart.py`` runs the stages and ``openpi.report`` explains their results section by
section. When both kept their own list they drifted (``sae_splice`` ran but belonged to no section, so its failure
explained nothing). Here every stage names the sections it feeds, the stages it needs and its main output; the
quickstart runs :data:`STAGES` in order and the report derives which stage explains which section from the same
list (``tests/test_quickstart.py`` checks that every stage feeds a section and every section has a stage).

Commands are the ones the README lists, for the data-path flags (``--rollouts DIR``: the LIBERO client's output
folder, for every script that reads rollouts).
"""
from __future__ import annotations

import dataclasses
import pathlib
import sys
from collections.abc import Callable

# Report sections, in page order (``openpi.report`` builds one section per id).
SECTIONS: tuple[str, ...] = ("evaluation", "attention", "sae", "probes", "geometry", "pca")

# What the policy server records for the stages below.
# Attention per head, averaged over the action tokens (the head-averaged analyses average heads when they load it;
# keeping heads lets the attention section choose a head on training episodes and test it on held-out ones).
RECORDS: tuple[str, ...] = ("llm.layer.*.attn.probs?tokens=actions&reduce=tokens",
                            "llm.expert1.layer.*.resid_post?tokens=actions")
# A Diffusion Policy (--policy dp): the spatial-softmax attention of each camera's encoder, the conditioning
# vector and the second block of every UNet stage (the SAE's site at every denoising step, the probes' at the last).
DP_SAE_SITE = "unet.mid.block.1"


def dp_probe_sites(block_names: list[str]) -> tuple[str, ...]:
    """The layers a Diffusion Policy's probes compare, input to output: the conditioning vector, then the last
    block of every UNet down / mid / up stage (``block_names``: ``openpi.models.diffusion.unet.block_names``)."""
    import re

    blocks = [n for n in block_names if re.fullmatch(r"(down|up)\.\d+\.block\.1|mid\.block\.1", n)]
    return ("cond.global", *(f"unet.{n}" for n in blocks))


def dp_records(probe_sites: tuple[str, ...]) -> tuple[str, ...]:
    last = tuple(f"{s}?steps=-1" for s in probe_sites if s.startswith("unet.") and s != DP_SAE_SITE)
    return ("enc.*.attn", "cond.global", DP_SAE_SITE, *last)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything a stage command depends on (the quickstart's arguments, resolved)."""

    out: pathlib.Path
    config: str
    checkpoint_dir: str | None
    suite: str
    task_ids: tuple[int, ...]
    first_trial: int
    trials: int
    max_steps: int
    layer: int  # action-expert layer index (already resolved, >= 0)
    num_workers: int = 1  # LIBERO environment processes
    num_steps: int = 10  # denoising steps of the served policy (Pi0: the server's default; DP: its config's)
    family: str = "pi0"  # "pi0" (Pi0 / Pi0.5) or "diffusion" (a Diffusion Policy: other sites, no language)
    dp_probe_sites: tuple[str, ...] = ()  # Diffusion Policy: the probed layers (dp_probe_sites), SAE site among them
    sae_steps: int | None = None  # None: the trainer's data-derived default
    port: int | None = None  # the policy server's port, set while it runs
    python: str = sys.executable

    @property
    def store(self) -> pathlib.Path:
        return self.out / "store"

    @property
    def rollouts(self) -> pathlib.Path:
        return self.out / "rollouts"

    @property
    def records(self) -> tuple[str, ...]:
        """What the policy server records."""
        return dp_records(self.dp_probe_sites) if self.family == "diffusion" else RECORDS

    @property
    def site(self) -> str:
        """The SAE's site, also the site the geometry and the one-layer analyses read."""
        return DP_SAE_SITE if self.family == "diffusion" else f"llm.expert1.layer.{self.layer}.resid_post"

    @property
    def site_name(self) -> str:
        return self.site if self.family == "diffusion" else f"expert1.layer{self.layer}"

    @property
    def probe_sites(self) -> tuple[str, ...]:
        return self.dp_probe_sites if self.family == "diffusion" else (self.site,)

    def layer_name(self, site: str) -> str:
        return self.site_name if site == self.site else site

    def export_dir(self, site: str) -> pathlib.Path:
        """Rows of ``site`` at the last denoising step (Pi0: its action tokens), the executed output."""
        return self.out / "export" / self.layer_name(site).replace(".", "_")

    @property
    def export_all_steps(self) -> pathlib.Path:
        """The SAE site's rows of every denoising step (the SAE's training data)."""
        return self.out / "export" / f"{self.site_name.replace('.', '_')}_all"

    @property
    def export_last_step(self) -> pathlib.Path:
        """The SAE site's rows of the last denoising step, the one whose output is executed (probes, geometry)."""
        return self.export_dir(self.site)

    @property
    def geometry_input(self) -> pathlib.Path:
        return self.out / "export" / "geometry_input"

    def policy_args(self) -> list[str]:
        return ["--config", self.config] + (["--checkpoint-dir", self.checkpoint_dir] if self.checkpoint_dir else [])


@dataclasses.dataclass(frozen=True)
class Stage:
    """One step of the quickstart.

    ``command(plan)`` is the argv of a separate process (its output goes to ``logs/<name>.log``); ``inline`` stages
    run in process instead. ``output`` is the file the stage's sections show, relative to the output folder: a
    stage that reported ok without it is itself a problem the report names. ``needs`` are stages that must have
    succeeded first (otherwise this one is skipped); ``server`` stages run while the policy server is up."""

    name: str
    sections: tuple[str, ...]
    output: str | None
    needs: tuple[str, ...] = ()
    command: Callable[[Plan], list[str]] | None = None
    inline: Callable[[Plan], object] | None = None
    server: bool = False
    primary: bool = True  # its output is what its sections show (False: a supporting step)

    def argv(self, plan: Plan) -> list[str]:
        if self.command is None:
            raise ValueError(f"stage {self.name} runs in process, it has no command")
        return self.command(plan)


def _libero_eval(p: Plan) -> list[str]:
    if p.port is None:
        raise ValueError("libero_eval needs the policy server's port (Plan.port)")
    return [p.python, "examples/libero/main.py", "--host", "127.0.0.1", "--port", str(p.port),
            "--task-suite-name", p.suite, "--task-ids", *map(str, p.task_ids), "--num-trials-per-task",
            str(p.trials), "--max-steps", str(p.max_steps), "--first-trial", str(p.first_trial), "--save-frames",
            # cameras (and masks) are rendered only where the policy is queried: the frames every row joins to
            "--no-render-every-step", "--num-workers", str(p.num_workers),
            "--out-dir", str(p.rollouts), "--video-out-path", str(p.out / "videos"), "--run-id", "quickstart"]


def _attention(p: Plan) -> list[str]:
    return [p.python, "evaluate_attention_iou.py", "--store", str(p.store), "--rollouts", str(p.rollouts), "--out",
            str(p.out / "attention"), "--overlays", "--overlay-every", "4", "--overwrite"]  # one PNG per 20 env steps


def _export_all(p: Plan) -> list[str]:
    return [p.python, "export_activations.py", "--store", str(p.store), "--site", p.site, "--rollouts",
            str(p.rollouts), "--out", str(p.export_all_steps)]


def _sae(p: Plan) -> list[str]:
    # Whole episodes held out (the export writes keys.npz); a quarter of them, so that a few-episode demo still
    # holds out more than one and the FVU gets an interval.
    return [p.python, "train_save.py", "--activations", str(p.export_all_steps / "X.npy"), "--keys",
            str(p.export_all_steps / "keys.npz"), "--arch", "topk", "--k", "8", "--num-latents", "128",
            "--holdout-frac", "0.25", "--out", str(p.out / "sae"), "--overwrite",
            *(["--steps", str(p.sae_steps)] if p.sae_steps else [])]


def _sae_splice(p: Plan) -> list[str]:
    return [p.python, "sae/splice_score.py", "--sae", str(p.out / "sae"), "--site", p.site, "--rollouts",
            str(p.rollouts), "--out", str(p.out / "sae" / "splice.json"), "--max-obs", "12", *p.policy_args()]


def _sae_dashboard(p: Plan) -> list[str]:
    return [p.python, "sae/dashboard.py", "--sae", str(p.out / "sae"), "--activations",
            str(p.export_all_steps / "X.npy"), "--keys", str(p.export_all_steps / "keys.npz"), "--rollouts",
            str(p.rollouts), "--num-features", "16", "--out", str(p.out / "sae" / "dashboard")]


def _export_last(p: Plan) -> object:
    """Every probed site's rows of the last denoising step (sites recorded once per query, like the DP's
    conditioning vector, have no step); rows are in key order, so the sites' files align row for row."""
    from openpi.interp.export import export_site
    from openpi.interp.store import ActivationStore

    store = ActivationStore(p.store)
    for site in p.probe_sites:
        per_step = bool((store.keys(site)["denoise_step"] >= 0).any())
        where = {"denoise_step": [p.num_steps - 1]} if per_step else None
        summary = export_site(p.store, site, p.export_dir(site), where=where, rollouts=p.rollouts)
        print(f"{site}: {summary['rows']} rows x {summary['width']} -> {p.export_dir(site)}")


def _probes(p: Plan) -> list[str]:
    e = p.export_last_step
    return [p.python, "linear_probe.py", "--features", *(str(p.export_dir(s) / "X.npy") for s in p.probe_sites),
            "--targets", str(e / "actions.npy"), "--groups", str(e / "groups.npy"), "--layer-names",
            *(p.layer_name(s) for s in p.probe_sites), "--n-folds", "2", "--out", str(p.out / "probes"),
            "--overwrite"]


def _geometry_input(p: Plan) -> object:
    from openpi.interp.export import trajectories_from_export

    return trajectories_from_export(p.export_last_step, p.geometry_input)


def _geometry(p: Plan) -> list[str]:
    g = p.geometry_input
    return [p.python, "geometry.py", "--trajectories", str(g / "T.npy"), "--success", str(g / "success.npy"),
            "--axes", "query", "--n-boot", "200", "--out", str(p.out / "geometry"), "--no-progress"]


def _action_pca(p: Plan) -> list[str]:
    return [p.python, "action_pca.py", "--rollouts", str(p.rollouts), "--out", str(p.out / "pca")]


STAGES: tuple[Stage, ...] = (
    Stage("libero_eval", ("evaluation",), "rollouts/results/*.json", command=_libero_eval, server=True),
    Stage("attention_iou", ("attention",), "attention/summary.json", needs=("libero_eval",), command=_attention),
    Stage("export_all_steps", ("sae",), None, needs=("libero_eval",), command=_export_all, primary=False),
    Stage("sae", ("sae",), "sae/metrics.json", needs=("export_all_steps",), command=_sae),
    # splicing needs token-indexed sites (the SAE replaces the action tokens' rows): Pi0 only for now
    Stage("sae_splice", ("sae",), "sae/splice.json", needs=("sae",), command=_sae_splice, primary=False),
    Stage("sae_dashboard", ("sae",), "sae/dashboard/index.html", needs=("sae",), command=_sae_dashboard,
          primary=False),
    Stage("export_last_step", ("probes", "geometry"), None, needs=("libero_eval",), inline=_export_last,
          primary=False),
    Stage("probes", ("probes",), "probes/probe_results.json", needs=("export_last_step",), command=_probes),
    Stage("geometry_input", ("geometry",), None, needs=("export_last_step",), inline=_geometry_input,
          primary=False),
    Stage("geometry", ("geometry",), "geometry/geometry.json", needs=("geometry_input",), command=_geometry),
    Stage("action_pca", ("pca",), "pca/action_pca.json", needs=("libero_eval",), command=_action_pca),
)


def stage(name: str) -> Stage:
    for s in STAGES:
        if s.name == name:
            return s
    raise KeyError(f"no quickstart stage {name!r}; stages: {[s.name for s in STAGES]}")


def section_stages(section: str) -> tuple[str, ...]:
    """The stages feeding a report section, in run order (a failed one explains a missing section)."""
    return tuple(s.name for s in STAGES if section in s.sections)


def section_producer(section: str) -> Stage | None:
    """The stage whose output the section shows."""
    return next((s for s in STAGES if section in s.sections and s.primary), None)
