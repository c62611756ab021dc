"""Helpers for stateful (streaming) use of the recurrent modules."""

import torch


def detach_state(state):
    """Cut the autograd history of a recurrent state, keeping its values (truncated BPTT).

    Accepts what the modules return and take as hx: a tensor (GRU, RNN), a tuple (h, c)
    (LSTM), nested lists/tuples of those, or None. Returns the same structure.

    Example (train on a long sequence in chunks of 50 steps)::

        state = None
        for chunk, target in zip(x.split(50, dim=1), y.split(50, dim=1)):   # batch_first
            output, state = lstm(chunk, state)
            loss_fn(head(output), target).backward()     # gradients stop at the chunk start
            optimizer.step(); optimizer.zero_grad()
            state = lstmkit.detach_state(state)
    """
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        return state.detach()
    if isinstance(state, (tuple, list)):
        return type(state)(detach_state(s) for s in state)
    raise TypeError(f"state must be a tensor, a tuple/list of tensors or None, "
                    f"got {type(state).__name__}")
