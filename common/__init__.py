"""What the single-file scripts share.

Here, the run machinery: `dist.py` (torchrun / torch.distributed setup and collectives), `logger.py` (TensorBoard),
`guards.py` (non-finite losses, SIGTERM), `checkpoint.py` (atomic, resumable checkpoints and the run-directory
checks), `fsdp.py` (FSDP2 sharding for full fine-tuning), `run.py` (the shell around every script's loop: resume, save,
evaluate-only, the end of an iteration). `models/` holds the models in their public checkpoint
formats, `envs/` the simulators, tasks, experts and demonstrations; each says what is inside and which script uses it.
"""
