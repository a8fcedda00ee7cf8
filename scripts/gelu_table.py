"""Print the coefficient table of the AVX-512 GELU (csrc/cpu/block_kernels.h, kGeluHalfErf).

GELU(x) = 0.5 x + |x| h(|x|) with h(t) = 0.5 erf(t / sqrt 2). [0, TOP) is cut into INTERVALS equal
pieces; on piece i, h((i + u) / s) for u in [0, 1) (s = INTERVALS / TOP) is a degree-DEGREE
polynomial in u, fitted by least squares at Chebyshev points. The kernel finds i and u with one
multiply, a truncation and a `vreduceps`, and the coefficients with one `vpermps` each (16 pieces =
one register per coefficient). Past TOP, h is 0.5 in float.

    python scripts/gelu_table.py            # the table and its error in float32 arithmetic
"""
from __future__ import annotations

import math

import numpy as np

INTERVALS, DEGREE, TOP = 16, 5, 6.0
LAST_PIECE = 15.99999  # the clamp of t * INTERVALS / TOP: below 16, so the piece index stays in the table


def half_erf(t: np.ndarray) -> np.ndarray:
    return 0.5 * np.vectorize(math.erf)(t / math.sqrt(2.0))


def fit() -> np.ndarray:
    """coefficients[d, i]: the u^d coefficient of piece i, rounded to float32."""
    nodes = 0.5 - 0.5 * np.cos(np.pi * (np.arange(256) + 0.5) / 256)  # Chebyshev points of [0, 1]
    scale = INTERVALS / TOP
    table = np.stack([np.polynomial.polynomial.polyfit(nodes, half_erf((i + nodes) / scale), DEGREE)
                      for i in range(INTERVALS)], axis=1)
    return table.astype(np.float32)


def float32_gelu(x: np.ndarray, table: np.ndarray) -> np.ndarray:
    """The kernel's arithmetic in float32 (each fma rounded once)."""
    t = np.abs(x)
    a = np.minimum(t * np.float32(INTERVALS / TOP), np.float32(LAST_PIECE))
    i = a.astype(np.int64)
    u = (a - np.floor(a)).astype(np.float64)
    p = table[DEGREE, i].astype(np.float64)
    for d in range(DEGREE - 1, -1, -1):
        p = (p * u + table[d, i]).astype(np.float32).astype(np.float64)
    return (t.astype(np.float64) * p + np.float64(np.float32(0.5) * x)).astype(np.float32)


def main() -> None:
    table = fit()
    x = np.linspace(-12.0, 12.0, 1_000_001, dtype=np.float32)
    exact = x.astype(np.float64) * (0.5 + half_erf(x.astype(np.float64)))
    err = np.abs(float32_gelu(x, table).astype(np.float64) - exact)
    print(f"// max |error| / (|x| + |GELU(x)|) over [-12, 12]: {float((err / (np.abs(x) + np.abs(exact) + 1e-30)).max()):.2e}")
    for d in range(DEGREE + 1):
        print("    {" + ", ".join(f"{v:.9g}f" for v in table[d]) + "},")


if __name__ == "__main__":
    main()
