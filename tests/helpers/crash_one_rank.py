"""mae_pretrain.py whose rank 1 dies in epoch 2, for the test that a failing process ends the whole run.

Run by tests/test_distributed.py under torchrun; the failure is injected here so the script itself carries
no test hooks."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import mae_pretrain  # noqa: E402

real_train_one_epoch = mae_pretrain.train_one_epoch


def failing_train_one_epoch(*args, **kwargs):
    if os.environ.get("RANK") == "1" and args[5] == 2:  # args[5] is the epoch
        raise RuntimeError("injected failure on rank 1")
    return real_train_one_epoch(*args, **kwargs)


mae_pretrain.train_one_epoch = failing_train_one_epoch
mae_pretrain.main(mae_pretrain.get_args_parser().parse_args())
