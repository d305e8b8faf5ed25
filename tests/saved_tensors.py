"""Test helper: how many bytes autograd keeps for a backward (to check the kernels' memory flags)."""

import torch


def saved_bytes(fn):
    """fn()'s result and the bytes of the distinct storages autograd keeps for its backward."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())
