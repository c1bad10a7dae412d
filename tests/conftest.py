import torch

# Tiny models gain nothing from intra-op threads; with pytest -n 2 on two cores, more threads only oversubscribe.
torch.set_num_threads(1)
