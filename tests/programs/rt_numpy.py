"""numpy matrix products with a multi-threaded OpenBLAS, busy when the checkpoint comes."""
import numpy as np

print("READY", flush=True)
rng = np.random.default_rng(7)
a = rng.random((700, 700))
acc = 0.0
for i in range(30):
    acc = (acc + float((a @ a)[i, i])) % 1e6
    a = a * 0.999 + 0.001
    if i % 10 == 0:
        print("round", i, flush=True)
print("result %.6f" % acc)
