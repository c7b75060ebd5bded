#!/usr/bin/env python3
"""FaaSdom's factors benchmark: every factor of n by trial division up to sqrt(n).

Usage: factors.py [N]   (default 2688834647444046); prints one JSON line.
"""
import json
import math
import sys


def factors(n):
    found = set()
    for i in range(1, math.isqrt(n) + 1):
        if n % i == 0:
            found.add(i)
            found.add(n // i)
    return sorted(found)


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2688834647444046
    if n <= 0:
        print("factors.py: N must be a positive integer", file=sys.stderr)
        return 2
    f = factors(n)
    print(json.dumps({"n": n, "count": len(f), "factors": f}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
