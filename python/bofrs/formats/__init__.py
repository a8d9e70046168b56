"""Quantization formats: one subpackage per family (block-wise, HIGGS), the Format value that
names any of them, packing, the Hadamard transform and error metrics."""
