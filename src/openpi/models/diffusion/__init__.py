"""Diffusion Policy (Chi et al. 2023) in JAX, loading LeRobot checkpoints unchanged.

Modules: ``config`` (LeRobot config.json), ``checkpoint`` (weights + key/shape validation), ``normalize``
(LeRobot's processor statistics), ``ops`` / ``resnet`` / ``spatial_softmax`` / ``encoder`` / ``unet`` (the
network), ``schedulers`` (DDPM / DDIM), ``model`` (encoding, loss, sampling, hook points), ``policy`` (a loaded
model with jit entry points and select_action queueing), ``parity`` (the CLI against LeRobot's own outputs).
"""
