"""Files: bofrs safetensors files, model checkpoints, and whole-checkpoint conversion."""
