#!/usr/bin/env python3
"""FaaSdom's matrix benchmark: two n x n tables of floor(random() * 100) and their naive
i-j-k product (pure Python), or numpy's product with --numpy when numpy is installed.

Usage: matrix.py [N [SEED]] [--numpy]; prints one JSON line. Seeded, so reproducible.
"""
import json
import random
import sys


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    use_numpy = "--numpy" in sys.argv
    n = int(args[0]) if args else 100
    rng = random.Random(int(args[1]) if len(args) > 1 else 42)
    a = [[float(int(rng.random() * 100)) for _ in range(n)] for _ in range(n)]
    b = [[float(int(rng.random() * 100)) for _ in range(n)] for _ in range(n)]
    if use_numpy:
        try:
            import numpy as np
        except ImportError:
            print("matrix.py: --numpy needs numpy (apt install python3-numpy)", file=sys.stderr)
            return 2
        c = (np.array(a) @ np.array(b)).tolist()
    else:
        c = [[0.0] * n for _ in range(n)]
        for i in range(n):
            ai, ci = a[i], c[i]
            for j in range(n):
                s = 0.0
                for k in range(n):
                    s += ai[k] * b[k][j]
                ci[j] = s
    checksum = sum(sum(row) for row in c)
    print(json.dumps({"n": n, "checksum": int(checksum), "c00": int(c[0][0]), "cnn": int(c[n - 1][n - 1])}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
