/* FaaSdom's factors benchmark in C: every factor of n, found by trial division up to
 * sqrt(n), printed as one JSON line. ROUNDS repeats the search (the same answer), to make
 * a run as long as a benchmark needs: 64-bit n keeps one search under about 20 s here.
 * Usage: factors [N [ROUNDS]]  (default 2688834647444046, 1 round) */
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

static int cmp(const void *a, const void *b) {
  uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
  return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
  uint64_t n = argc > 1 ? strtoull(argv[1], NULL, 10) : 2688834647444046ULL;
  long rounds = argc > 2 ? atol(argv[2]) : 1;
  if (n == 0 || rounds < 1) { fprintf(stderr, "factors: N and ROUNDS must be positive integers\n"); return 2; }
  uint64_t r = (uint64_t)sqrtl((long double)n);
  while (r * r > n) r--;
  while ((r + 1) * (r + 1) <= n) r++;
  size_t cap = 1024, k = 0;
  uint64_t *f = malloc(cap * sizeof *f);
  for (long round = 0; round < rounds; round++) {
    k = 0;
    for (uint64_t i = 1; i <= r; i++) {
      if (n % i == 0) {
        if (k + 2 > cap) f = realloc(f, (cap *= 2) * sizeof *f);
        f[k++] = i;
        if (n / i != i) f[k++] = n / i;
      }
    }
  }
  qsort(f, k, sizeof *f, cmp);
  printf("{\"n\": %" PRIu64 ", \"count\": %zu, \"factors\": [", n, k);
  for (size_t i = 0; i < k; i++) printf("%s%" PRIu64, i ? ", " : "", f[i]);
  printf("]}\n");
  return 0;
}
