"""Preloaded by the forkserver that forks ManiSkill's CPU env workers, so that the server exits with the trainer.

The workers ask the kernel to kill them when their parent, the forkserver, dies (`exit_with_parent`). The forkserver
alone would not notice a trainer killed with SIGKILL: it waits for every holder of its "alive" pipe to close it, and
each process it forked holds that pipe too. Importing this module in the server (`set_forkserver_preload`) ties the
server to the trainer, its parent, the same way. (Should the trainer die before this runs, no request of its can
reach the server any more; a worker it had already asked for sees at its own `exit_with_parent` that its parent's
parent is no longer the trainer, and exits.)
"""

import os

from common.guards import exit_with_parent

exit_with_parent(os.getppid())
