"""The simulators as the policies see them: batched envs that return the model's image and instruction and take
its action, plus the tasks, experts and demonstrations built on them.

- `maniskill.py`: ManiSkill3 envs (GPU simulation in one process, or CPU worker processes each stepping a slice).
  Used by ppo_openvla.py, grpo_internvl.py, the SFT scripts and collect_demos.py.
- `put_on_plate_25.py`, `put_on_plate_25_ood.py`: RLinf's PutOnPlateInScene25Main-v3 task and its 13
  out-of-distribution variants, registered with ManiSkill on import.
- `libero.py`, `libero_image.py`: LIBERO suites in worker processes and the OpenVLA-OFT evaluation's image
  pipeline (flip, JPEG round trip, Lanczos resize, center crop). Used by srpo_openvla_oft.py.
- `experts.py`, `demos.py`: scripted ManiSkill experts and the demonstration folder format. Used by
  collect_demos.py and the SFT scripts.
"""
