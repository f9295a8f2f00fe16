"""What the single-file scripts share.

Here, the run machinery: `dist.py` (torchrun / torch.distributed setup and collectives), `logger.py` (TensorBoard),
`guards.py` (non-finite losses, SIGTERM), `checkpoint.py` (atomic, resumable checkpoints and the run-directory
checks), `fsdp.py` (FSDP2 sharding for full fine-tuning). `models/` holds the models in their public checkpoint
formats, `envs/` the simulators, tasks, experts and demonstrations; each says what is inside and which script uses it.
"""
