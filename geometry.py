"""Representation-trajectory geometry: step distances and curvature angles, split by success vs failure.

Thin command line over ``openpi.interp.geometry_cli`` (options, outputs and formats: its docstring, or ``--help``).
"""
import sys

import tyro

from openpi.interp.geometry_cli import Args, main

if __name__ == "__main__":
    sys.exit(main(tyro.cli(Args)))
