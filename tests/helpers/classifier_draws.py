"""train_classifier.py under torchrun (gloo on the CPU), its command-line flags as given, with each process's
augmentation draws recorded (train_classifier.augment_draws) and saved to draws_rank<N>.pt in the working folder:
the processes train on different images and must draw different crops, ops and erasing for them. Run by
tests/test_distributed.py."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import torch  # noqa: E402

import train_classifier  # noqa: E402
import utils  # noqa: E402

draws, augment_draws = [], train_classifier.augment_draws


def recording(*args, **kwargs):
    draws.append(augment_draws(*args, **kwargs))
    return draws[-1]


train_classifier.augment_draws = recording
train_classifier.main(train_classifier.get_args_parser().parse_args())
torch.save(draws, f"draws_rank{utils.dist_env()[0]}.pt")
