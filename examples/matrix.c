/* FaaSdom's matrix benchmark in C: two n x n tables of floor(random() * 100) and their
 * naive i-j-k product; prints the size, a checksum and a corner of the result as one JSON
 * line. The generator is seeded, so a run is reproducible. Usage: matrix [N [SEED]] */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

static uint64_t state;
static double uniform(void) { /* xorshift64*, in [0, 1) */
  state ^= state >> 12; state ^= state << 25; state ^= state >> 27;
  return (double)((state * 2685821657736338717ULL) >> 11) / 9007199254740992.0;
}

int main(int argc, char **argv) {
  long n = argc > 1 ? atol(argv[1]) : 100;
  state = argc > 2 ? strtoull(argv[2], NULL, 10) : 42;
  if (n <= 0 || state == 0) { fprintf(stderr, "matrix: N and SEED must be positive\n"); return 2; }
  double *a = malloc(sizeof(double) * n * n), *b = malloc(sizeof(double) * n * n), *c = calloc(n * n, sizeof(double));
  for (long i = 0; i < n * n; i++) a[i] = (double)(long)(uniform() * 100);
  for (long i = 0; i < n * n; i++) b[i] = (double)(long)(uniform() * 100);
  for (long i = 0; i < n; i++)
    for (long j = 0; j < n; j++) {
      double s = 0;
      for (long k = 0; k < n; k++) s += a[i * n + k] * b[k * n + j];
      c[i * n + j] = s;
    }
  double sum = 0;
  for (long i = 0; i < n * n; i++) sum += c[i];
  printf("{\"n\": %ld, \"checksum\": %.0f, \"c00\": %.0f, \"cnn\": %.0f}\n", n, sum, c[0], c[n * n - 1]);
  return 0;
}
