"""Host-side launch arithmetic in plain Python.

``triton.cdiv`` and ``triton.next_power_of_2`` are ``constexpr_function`` objects in recent Triton releases: each
call from the host costs microseconds of argument unwrapping, which adds up to a noticeable share of a small op's
launch work (token compaction runs several launches of a few microseconds each). These are the same functions for
Python ints.
"""


def cdiv(a: int, b: int) -> int:
    """Ceiling of a / b for non-negative ints."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n, for n >= 1."""
    return 1 << max(n - 1, 0).bit_length()
