import torch

# Tiny models: one thread is faster than two fighting over a shared 2-core machine, and results repeat.
torch.set_num_threads(1)
