"""Hadamard matrices of any order this project needs, including non-powers of two.

An order ``n = K * 2**m`` is built as the Kronecker product ``H_K ⊗ H_{2^m}`` where
``H_K`` comes from a Paley construction (orders 12, 20, 24, 28, ...), so SmolLM2's
192 = 12 * 16 channels get an exact Hadamard rotation.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["hadamard_matrix", "has_hadamard", "hadamard_factors", "HadamardOrderError"]


class HadamardOrderError(ValueError):
    """No Hadamard construction is known to this module for the requested order."""


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % p for p in range(2, int(q**0.5) + 1))


def _quadratic_character(q: int) -> list[int]:
    squares = {(i * i) % q for i in range(1, q)}
    return [0 if a == 0 else (1 if a in squares else -1) for a in range(q)]


def _jacobsthal(q: int) -> torch.Tensor:
    chi = _quadratic_character(q)
    return torch.tensor([[chi[(j - i) % q] for j in range(q)] for i in range(q)], dtype=torch.float64)


def _paley_one(q: int) -> torch.Tensor:
    """Order q+1 for a prime q ≡ 3 (mod 4)."""
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(q)
    return s + torch.eye(q + 1, dtype=torch.float64)


def _paley_two(q: int) -> torch.Tensor:
    """Order 2(q+1) for a prime q ≡ 1 (mod 4)."""
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(q)
    a = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)


@functools.lru_cache(maxsize=None)
def _base_matrices() -> dict[int, torch.Tensor]:
    """Non-power-of-two base orders up to 256 from the two Paley constructions."""
    base: dict[int, torch.Tensor] = {}
    for q in range(3, 256):
        if not _is_prime(q):
            continue
        if q % 4 == 3 and (q + 1) & q:  # skip powers of two: Sylvester covers them
            base.setdefault(q + 1, _paley_one(q))
        if q % 4 == 1 and 2 * (q + 1) <= 512:
            order = 2 * (q + 1)
            if order & (order - 1):
                base.setdefault(order, _paley_two(q))
    return base


def hadamard_factors(n: int) -> tuple[int, int]:
    """Split ``n`` into ``(K, 2**m)`` with a known base order ``K`` (1 for powers of two)."""
    if n < 1:
        raise HadamardOrderError(f"Hadamard order must be positive, got {n}")
    power = n & -n
    odd_part = n // power
    if odd_part == 1:
        return 1, n
    base = _base_matrices()
    # Move powers of two from the Sylvester factor into K until K is a known base order.
    k, p = odd_part, power
    while p >= 1:
        if k in base:
            return k, p
        k, p = k * 2, p // 2
        if p < 1:
            break
    raise HadamardOrderError(
        f"no Hadamard matrix of order {n} is known to rkv (supported: 2^m and K*2^m with K in "
        f"{sorted(base)[:12]}...); choose a head-group size whose channel count has one"
    )


def has_hadamard(n: int) -> bool:
    try:
        hadamard_factors(n)
    except HadamardOrderError:
        return False
    return True


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@functools.lru_cache(maxsize=64)
def _hadamard_cached(n: int) -> torch.Tensor:
    k, p = hadamard_factors(n)
    h = _sylvester(p)
    if k > 1:
        h = torch.kron(_base_matrices()[k], h)
    return h


def hadamard_matrix(n: int, normalized: bool = True, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ``n × n`` Hadamard matrix (entries ±1, or ±1/√n when ``normalized`` so it is orthonormal)."""
    h = _hadamard_cached(n)
    if normalized:
        h = h / n**0.5
    return h.to(dtype).clone()
