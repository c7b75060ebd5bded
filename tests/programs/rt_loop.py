"""A pure-Python loop across a checkpoint (dicts, lists, big integers, generators)."""
import sys

print("READY", flush=True)
d, total = {}, 0
for i in range(400_000):
    d[i % 1000] = d.get(i % 1000, 0) + i * i
    total += sum(x for x in (i, i // 3, i % 7))
    if i % 100_000 == 0:
        print("step", i, flush=True)
print("total", total, "dict", sum(d.values()) % 1_000_000_007, "big", (3 ** 2000) % 1_000_000_007)
