/* For the snapshot checkpoint: keeps changing 32 MiB of memory and printing while a
 * leave-running checkpoint is taken. Prints READY, then STEPS (argv[1], default 1500) lines
 * "step I H" (H: a running hash of the slice it just rewrote), sleeping 1 ms between
 * steps, then "final S" (a checksum of all the memory). Deterministic: any run, and any
 * copy restored from a checkpoint, prints the same lines from where it is. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define WORDS (32u << 20) / 8
#define SLICE (256u << 10) / 8

int main(int argc, char **argv) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  int steps = argc > 1 ? atoi(argv[1]) : 1500;
  uint64_t *m = malloc(WORDS * sizeof *m);
  uint64_t x = 88172645463325252ull;
  for (size_t i = 0; i < WORDS; i++) {
    x ^= x << 13; x ^= x >> 7; x ^= x << 17;
    m[i] = x;
  }
  printf("READY\n");
  uint64_t h = 1469598103934665603ull;
  struct timespec ms = {0, 1000000};
  for (int s = 0; s < steps; s++) {
    size_t base = ((size_t)s * 7919 % (WORDS / SLICE)) * SLICE;
    for (size_t i = base; i < base + SLICE; i++) {
      m[i] = m[i] * 6364136223846793005ull + (uint64_t)s;
      h = (h ^ m[i]) * 1099511628211ull;
    }
    printf("step %d %016llx\n", s, (unsigned long long)h);
    nanosleep(&ms, NULL);
  }
  uint64_t sum = 0;
  for (size_t i = 0; i < WORDS; i++) sum = sum * 31 + m[i];
  printf("final %016llx\n", (unsigned long long)sum);
  return 0;
}
