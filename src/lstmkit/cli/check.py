"""`lstmkit check`: verify this installation against torch.nn on random inputs, in seconds.

Runs lstmkit's LSTM, GRU and RNN next to torch.nn's with the same weights (float64), forward
and backward, on every kernel backend that runs on this machine, and prints the largest
difference of each. Exit code 1 if any exceeds 1e-10.
"""

import torch

TOLERANCE = 1e-10


def register(subparsers):
    parser = subparsers.add_parser("check", help="compare lstmkit with torch.nn on random inputs",
                                   description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0,
                        help="random seed of the weights and inputs (default 0)")
    parser.set_defaults(run=run)


def largest_differences(family: str, seed: int, backend: str) -> tuple[float, float]:
    """Max |lstmkit - torch.nn| over outputs and over all gradients, float64, 2 layers, 2 dirs."""
    import lstmkit

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        ours = getattr(lstmkit, family)(5, 7, num_layers=2, bidirectional=True,
                                        dtype=torch.float64, backend=backend)
    theirs = getattr(torch.nn, family)(5, 7, num_layers=2, bidirectional=True, dtype=torch.float64)
    theirs.load_state_dict(ours.state_dict())
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(9, 3, 5, dtype=torch.float64, generator=generator)
    weight = torch.randn(9, 3, 14, dtype=torch.float64, generator=generator)
    results = []
    for module in (ours, theirs):
        xi = x.clone().requires_grad_()
        out, _ = module(xi)
        (out * weight).sum().backward()
        results.append((out.detach(), [xi.grad] + [p.grad for p in module.parameters()]))
    (out_a, grads_a), (out_b, grads_b) = results
    forward = (out_a - out_b).abs().max().item()
    backward = max((a - b).abs().max().item() for a, b in zip(grads_a, grads_b))
    return forward, backward


def available_backends() -> list[str]:
    """The concrete kernel backends that run here (the native one only where it built)."""
    from lstmkit.kernels import native

    return ["portable"] + (["native"] if native.available() else [])


def run(args) -> int:
    failed = False
    for backend in available_backends():
        for family in ("LSTM", "GRU", "RNN"):
            forward, backward = largest_differences(family, args.seed, backend)
            ok = max(forward, backward) <= TOLERANCE
            failed |= not ok
            print(f"{family:5s} {backend:8s} max |lstmkit - torch.nn|: output {forward:.1e}, "
                  f"gradients {backward:.1e}  {'ok' if ok else 'MISMATCH'}")
    print("lstmkit matches torch.nn." if not failed else "lstmkit does NOT match torch.nn.")
    return 1 if failed else 0
