"""HIGGS: Hadamard rotation plus Gaussian MSE-optimal grids (scalar and 2-D)."""
