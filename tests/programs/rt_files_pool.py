"""A script that holds open files (reading one, appending to another) and runs a thread pool
(concurrent.futures, no multiprocessing) across a checkpoint."""
import concurrent.futures as cf
import hashlib
import os

with open("input.txt", "w") as f:
    f.write("".join("line %d\n" % i for i in range(2000)))
src = open("input.txt")
log = open("log.txt", "w")


def work(n):
    h = hashlib.sha256()
    for k in range(20_000):
        h.update(b"%d:%d" % (n, k))
    return n, h.hexdigest()[:12]


print("READY", flush=True)
results = []
with cf.ThreadPoolExecutor(max_workers=4) as pool:
    for rnd in range(6):
        lines = [src.readline().strip() for _ in range(100)]
        for n, digest in pool.map(work, range(rnd * 8, rnd * 8 + 8)):
            results.append(digest)
        log.write("round %d last %s\n" % (rnd, lines[-1]))
        log.flush()
        print("round", rnd, lines[-1], flush=True)
log.close()
print("digests", hashlib.sha256("".join(results).encode()).hexdigest()[:16])
print("log lines", sum(1 for _ in open("log.txt")), "offset", src.tell(), "size", os.path.getsize("input.txt"))
