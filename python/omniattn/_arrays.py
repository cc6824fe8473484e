"""numpy / torch plumbing shared by the package. torch is optional: it is only looked at when already imported."""

import sys

import numpy as np


def torch_module():
    """The torch module if the program imported it, else None (omniattn never imports torch itself)."""
    return sys.modules.get("torch")


def is_torch(x):
    torch = torch_module()
    return torch is not None and isinstance(x, torch.Tensor)


def is_array(x):
    return isinstance(x, np.ndarray) or is_torch(x)


def to_numpy(x, what):
    """A numpy view of x (numpy array or CPU torch tensor; torch bfloat16 is widened to float32, a copy)."""
    if isinstance(x, np.ndarray):
        return x
    if is_torch(x):
        torch = torch_module()
        x = x.detach()
        if x.device.type != "cpu":
            raise ValueError(f"omniattn: {what} is on {x.device}; omniattn runs on the CPU")
        if x.dtype == torch.bfloat16:
            x = x.float()
        return x.numpy()
    raise TypeError(f"omniattn: {what} must be a numpy array or a torch tensor, not {type(x).__name__}")


def broadcast_table(table, shape, what):
    """table broadcast (numpy rules, no copy) to the 4-d shape [batch, heads, seq_q, seq_k]."""
    table = np.asarray(table)
    if table.ndim > 4:
        raise ValueError(f"omniattn: {what} has {table.ndim} dimensions; it must broadcast to "
                         f"[batch, heads, seq_q, seq_k] = {tuple(shape)}")
    try:
        return np.broadcast_to(table, tuple(shape))
    except ValueError:
        raise ValueError(f"omniattn: {what} of shape {table.shape} does not broadcast to "
                         f"[batch, heads, seq_q, seq_k] = {tuple(shape)}") from None
