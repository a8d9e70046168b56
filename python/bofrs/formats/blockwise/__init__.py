"""Block-wise 4-bit formats: codebooks (NF4, AF4, FP4, INT4, BOF4, BOF4-S) and their optimizer,
OPQ outliers, the packed tensor and its fused product."""
