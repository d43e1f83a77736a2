"""Simulation environments for evaluating policies (LIBERO), their observation preprocessing and perturbations.

Import submodules directly (``openpi.envs.libero_env``, ``openpi.envs.perturbations``, ``openpi.envs.rollout``);
LIBERO itself is imported lazily, only when an environment is created.
"""
