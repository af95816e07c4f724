"""PyTorch peers for the benchmarks: the same problem, written with other libraries.

Each peer module (``torch_plain``, ``torch_higher``, ``torch_torchopt``) exposes

    train(problem) -> list of (W, b) numpy pairs      # plain training, no graph
    hypergrad(problem) -> (value, {"log_l2", "lr", "momentum"} -> np.ndarray)

on a :class:`benchmarks.peers.common.B1Problem`. ``common`` needs only numpy, so
a runner can build and save problems without importing torch.
"""

PEERS = ("torch_plain", "torch_higher", "torch_torchopt")
