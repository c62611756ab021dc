"""The float32 tanh of the native kernels: its coefficients, and its accuracy as the kernels run it.

The kernels compute tanh(x) = x P(x^2) / Q(x^2) with x clamped to [-9, 9] (past 9, tanh rounds
to +-1 in float32) and P(0) = Q(0) = 1, so tiny x come out exact. This fits P and Q to minimise
the largest relative error on (0, 9] (linear programs on a dense grid, each weighted by the last
Q: the standard linearisation of a rational minimax fit), prints them as _native.cpp spells
them, then measures the tanh the kernels actually compute (through a tanh RNN whose step is
h = tanh(x)) in ulp against float64, beside torch.tanh's:

    python benchmarks/tanh_fit.py                 # fit (6 numerator, 5 denominator terms)
    python benchmarks/tanh_fit.py --terms 5,4 --samples 4000000
"""

import argparse

import numpy as np
import torch
from scipy.optimize import linprog

import lstmkit


def fit(numerator_terms: int, denominator_terms: int, bound: float = 9.0, rounds: int = 10):
    """-> (p, q, largest relative error): coefficients of powers of x^2, p[0] = q[0] = 1."""
    x = np.unique(np.concatenate([np.linspace(1e-4, bound, 6000), np.geomspace(1e-4, 1, 400)]))
    f, u = np.tanh(x), x * x
    np_, nq = numerator_terms, denominator_terms - 1
    # Unknowns p1.., q1.., t: |x P(u) - f Q(u)| <= t f Q_last(u), minimise t.
    P = np.stack([x * u**k for k in range(1, np_)], 1)
    Q = np.stack([u**k for k in range(1, nq + 1)], 1)
    q_last, best = np.ones_like(x), None
    for _ in range(rounds):
        w = f * q_last
        rows = np.hstack([P, -f[:, None] * Q, -w[:, None]])
        flipped = np.hstack([-P, f[:, None] * Q, -w[:, None]])
        cost = np.zeros(rows.shape[1])
        cost[-1] = 1
        r = linprog(cost, A_ub=np.vstack([rows, flipped]), b_ub=np.concatenate([f - x, x - f]),
                    bounds=[(None, None)] * (rows.shape[1] - 1) + [(0, None)], method="highs")
        if r.x is None:
            break
        p = np.concatenate([[1.0], r.x[:np_ - 1]])
        q = np.concatenate([[1.0], r.x[np_ - 1:-1]])
        q_last = np.polyval(q[::-1], u)
        error = np.abs(x * np.polyval(p[::-1], u) / q_last / f - 1).max()
        if best is None or error < best[2]:
            best = (p, q, error)
    return best


def kernel_tanh(x: np.ndarray) -> np.ndarray:
    """The native kernels' float32 tanh of x (float32), via an RNN with h_t = tanh(x_t)."""
    rnn = lstmkit.RNN(1, 16, backend="native")
    with torch.no_grad():
        rnn.weight_ih_l0.fill_(1)
        for name in ("weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
            getattr(rnn, name).zero_()
        rows = 64
        padded = np.resize(x, (len(x) + rows - 1) // rows * rows)
        out, _ = rnn(torch.from_numpy(padded).view(-1, rows, 1))
    return out[..., 0].reshape(-1)[:len(x)].numpy()


def ulp_errors(got: np.ndarray, x: np.ndarray) -> np.ndarray:
    wanted = np.tanh(x.astype(np.float64))
    return np.abs(got.astype(np.float64) - wanted) / np.spacing(
        np.abs(wanted).astype(np.float32)).astype(np.float64)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--terms", default="6,5", help="numerator,denominator terms (default 6,5)")
    parser.add_argument("--samples", type=int, default=2_000_000,
                        help="floats drawn uniformly by bit pattern from [2^-20, 12]")
    args = parser.parse_args()
    numerator, denominator = (int(v) for v in args.terms.split(","))
    p, q, error = fit(numerator, denominator)
    print(f"fit: largest relative error {error:.2e} in exact arithmetic")
    print("  P:", ", ".join(f"{v:.17g}" for v in p))
    print("  Q:", ", ".join(f"{v:.17g}" for v in q))
    lo, hi = np.array([2.0**-20, 12.0], dtype=np.float32).view(np.int32)
    bits = np.random.default_rng(0).integers(lo, hi, args.samples, dtype=np.int32)
    x = bits.view(np.float32)
    x = np.concatenate([x, -x])
    for name, got in (("lstmkit (native kernels)", kernel_tanh(x)),
                      ("torch.tanh", torch.tanh(torch.from_numpy(x)).numpy())):
        e = ulp_errors(got, x)
        print(f"{name:>25}: max {e.max():.2f} ulp (at x = {x[e.argmax()]:.6g}), "
              f"mean {e.mean():.3f} ulp over {len(x)} floats")


if __name__ == "__main__":
    main()
