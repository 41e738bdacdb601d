import os

import torch

if not torch.cuda.is_available():
    # Without a GPU, Triton kernels run only under the interpreter ("0 active drivers" otherwise).
    # The variable is read when triton.jit decorates a kernel, so it must be set before any kernel
    # module is imported: conftest.py is loaded before the test modules.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # The tensors here are tiny: with several threads on a shared 2-core box, thread wake-ups cost
    # more than the math (the naive T=130 backward took 1.7 s on 2 threads, 0.1 s on 1).
    torch.set_num_threads(1)
