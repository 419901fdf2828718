"""mae_pretrain.py under torchrun with every process on the first GPU, talking over gloo: how tests/test_gpu.py runs
the several-process path (CUDA graphs, utils.average_gradients) on a machine with one GPU, where NCCL refuses two
ranks on one device.

    torchrun --standalone --nproc_per_node=2 tests/helpers/shared_gpu.py [mae_pretrain.py flags]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import torch.distributed as dist  # noqa: E402

import mae_pretrain  # noqa: E402

os.environ["LOCAL_RANK"] = "0"  # utils.resolve_device gives each process the GPU of its local rank
dist.init_process_group("gloo")  # utils.init_distributed keeps a group that exists
mae_pretrain.main(mae_pretrain.get_args_parser().parse_args(sys.argv[1:]))
