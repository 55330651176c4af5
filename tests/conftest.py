"""Test-session set-up.

One torch thread: the suite's tensors are small, and on a shared two-core machine two threads per
process oversubscribe the cores (measured: the engine tests ran about ten times slower under load
with torch's default of two threads than with one).
"""

import torch

torch.set_num_threads(1)
