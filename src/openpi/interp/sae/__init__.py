"""Sparse autoencoders on policy activations: training, metrics, SAELens I/O, feature mining, scoring, dashboard."""
