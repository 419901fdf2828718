"""utils' collectives under torchrun (gloo on the CPU), in one launch for tests/test_distributed.py's two tests of
them; each rank writes its results in the working folder, a file each (the ranks' prints would interleave).

- rank<N>.txt: what utils.all_processes gives each rank when only rank 1's value is false, and when every value
  is true.
- rank<N>.pt: utils.broadcast_state and utils.average_gradients. Each rank builds a small model from a seed of its
  own, makes its state rank 0's, then fills its .grad buffers with its own numbers and averages them in place; the
  file holds what it started from and ends with."""
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

torch.manual_seed(rank)
model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
model[1].running_mean.normal_()  # a buffer that differs between the ranks too
built = {k: v.clone() for k, v in model.state_dict().items()}
utils.broadcast_state(model)
optimizer = utils.make_adamw(utils.weight_decay_groups(model, 0.05), 1e-3, (0.9, 0.95), cpu)
params = [p for group in optimizer.param_groups for p in group["params"]]
own = [torch.randn_like(p) for p in params]
for p, grad in zip(params, own):
    p.grad.copy_(grad)
buffers, (flat,) = [p.grad for p in params], utils.grad_buffers(optimizer)  # one buffer: every parameter is fp32
utils.average_gradients(optimizer)
averaged = [p.grad.clone() for p in params]
# The steps add into the same .grad tensors, still views of the one buffer the all-reduce took whole.
in_place = all(p.grad is buffer and p.grad._base is flat for p, buffer in zip(params, buffers)) and \
    torch.equal(flat, torch.cat([g.flatten() for g in averaged]))
torch.save({"built": built, "state": model.state_dict(), "own": own, "averaged": averaged, "in_place": in_place},
           f"rank{rank}.pt")
utils.close_distributed()
