"""Train a TopK / BatchTopK sparse autoencoder on activation rows and save it in SAELens' layout.

Thin command line over ``openpi.interp.sae.train_cli`` (options, outputs and formats: its docstring, or ``--help``).
"""
from openpi.interp.sae.train_cli import main

if __name__ == "__main__":
    main()
