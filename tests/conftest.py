import torch


def pytest_configure(config):
    # The test models are tiny: one thread avoids OpenMP overhead and contention on shared 2-core machines.
    torch.set_num_threads(1)
