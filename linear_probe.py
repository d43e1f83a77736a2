"""Linear probes per layer: grouped-CV ridge (regression) or logistic (binary / multiclass), baselines, INLP.

Thin command line over ``openpi.interp.probe_cli`` (options, outputs and formats: its docstring, or ``--help``).
"""
import sys

import tyro

from openpi.interp.probe_cli import Args, main

if __name__ == "__main__":
    sys.exit(main(tyro.cli(Args)))
