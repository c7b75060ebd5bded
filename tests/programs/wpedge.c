/* Changes memory in every way dirty-page tracking must notice, then prints a checksum of
 * it all, once per iteration:
 *  - an ordinary write to a few pages of a 16 MiB area (the rest stays unchanged);
 *  - read(2) from a pipe into a page (the kernel writes, not the program);
 *  - MADV_DONTNEED on a 1 MiB window (it reads back as zeros, nothing was written);
 *  - a 2 MiB area replaced at the same address by a new mapping (MAP_FIXED);
 *  - two 1 MiB areas swapping places with mremap (their pages move, unwritten);
 *  - the heap grown with sbrk and filled.
 * Usage: wpedge ITERS MS */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define MIB (1UL << 20)

static uint64_t fnv(uint64_t h, const unsigned char *p, size_t n) {
  for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 1099511628211ULL;
  return h;
}

static void fill(unsigned char *p, size_t n, uint64_t seed) {
  uint64_t x = seed * 2654435761ULL + 1;
  for (size_t i = 0; i < n; i += 8) {
    x ^= x << 13; x ^= x >> 7; x ^= x << 17;
    memcpy(p + i, &x, 8);
  }
}

static void *map_at(void *at, size_t n, int fixed) {
  void *p = mmap(at, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | (fixed ? MAP_FIXED : 0), -1, 0);
  if (p == MAP_FAILED) { perror("mmap"); exit(1); }
  return p;
}

int main(int argc, char **argv) {
  if (argc < 3) { fprintf(stderr, "usage: wpedge ITERS MS\n"); return 2; }
  setvbuf(stdout, NULL, _IOLBF, 0);
  long iters = atol(argv[1]), ms = atol(argv[2]);
  /* Areas separated by PROT_NONE gaps, so that none merge with another. */
  unsigned char *res = mmap(NULL, 64 * MIB, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (res == MAP_FAILED) { perror("mmap"); return 1; }
  unsigned char *a = map_at(res + 2 * MIB, 16 * MIB, 1);
  unsigned char *b = map_at(res + 20 * MIB, 2 * MIB, 1);
  unsigned char *c = map_at(res + 24 * MIB, MIB, 1);
  unsigned char *d = map_at(res + 26 * MIB, MIB, 1);
  unsigned char *tmp = res + 28 * MIB;
  fill(a, 16 * MIB, 1);
  fill(b, 2 * MIB, 2);
  fill(c, MIB, 3);
  fill(d, MIB, 4);
  int fds[2];
  if (pipe(fds)) { perror("pipe"); return 1; }
  printf("READY\n");
  /* Heap growth: sbrk's pieces (malloc may use the heap too, so each piece is its own). */
  unsigned char *heap[1024];
  for (long i = 1; i <= iters; i++) {
    struct timespec t = { ms / 1000, (ms % 1000) * 1000000L };
    nanosleep(&t, NULL);
    /* An ordinary write: one page per iteration, somewhere in the first half. */
    fill(a + ((i * 37) % 2048) * 4096, 4096, 100 + i);
    /* The kernel writes: read(2) from a pipe into a page of the second half. */
    unsigned char msg[64];
    fill(msg, sizeof msg, 200 + i);
    if (write(fds[1], msg, sizeof msg) != (ssize_t)sizeof msg) { perror("write"); return 1; }
    if (read(fds[0], a + 8 * MIB + ((i * 11) % 2048) * 4096 + 100, sizeof msg) != (ssize_t)sizeof msg) { perror("read"); return 1; }
    /* Zeroed without a write: one 1 MiB window of the last 4 MiB. */
    madvise(a + 12 * MIB + (i % 4) * MIB, MIB, MADV_DONTNEED);
    /* Replaced at the same address. */
    b = map_at(b, 2 * MIB, 1);
    fill(b, 2 * MIB, 300 + i);
    /* c and d swap places: their pages move and are not written. */
    if (mremap(c, MIB, MIB, MREMAP_MAYMOVE | MREMAP_FIXED, tmp) == MAP_FAILED ||
        mremap(d, MIB, MIB, MREMAP_MAYMOVE | MREMAP_FIXED, c) == MAP_FAILED ||
        mremap(tmp, MIB, MIB, MREMAP_MAYMOVE | MREMAP_FIXED, d) == MAP_FAILED) {
      perror("mremap");
      return 1;
    }
    /* The heap grows. */
    if (i > 1024 || (heap[i - 1] = sbrk(64 * 1024)) == (void *)-1) { perror("sbrk"); return 1; }
    fill(heap[i - 1], 64 * 1024, 400 + i);
    uint64_t h = 14695981039346656037ULL;
    h = fnv(h, a, 16 * MIB);
    h = fnv(h, b, 2 * MIB);
    h = fnv(h, c, MIB);
    h = fnv(h, d, MIB);
    for (long k = 0; k < i; k++) h = fnv(h, heap[k], 64 * 1024);
    printf("iteration %ld checksum %016llx\n", i, (unsigned long long)h);
  }
  return 0;
}
