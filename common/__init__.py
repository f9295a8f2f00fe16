"""Small helpers shared by the single-file scripts (distributed setup, checkpoints, logging, envs, models)."""
