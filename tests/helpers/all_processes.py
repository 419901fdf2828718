"""utils.all_processes under torchrun (gloo on the CPU): writes to rank<N>.txt in the working folder what each
rank gets when only rank 1's value is false, and when every value is true (a file each: the ranks' prints would
interleave). Run by tests/test_distributed.py."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import torch  # noqa: E402

import utils  # noqa: E402

cpu = torch.device("cpu")
utils.init_distributed(cpu)
rank = utils.dist_env()[0]
with open(f"rank{rank}.txt", "w") as f:
    f.write(f"{utils.all_processes(rank != 1, cpu)} {utils.all_processes(True, cpu)}")
utils.close_distributed()
