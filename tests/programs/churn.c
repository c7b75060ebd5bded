/* A process with a large heap that changes only a small part of it over time: fills MIB
 * MiB with pseudo-random bytes, then for ITERS iterations sleeps MS milliseconds and
 * rewrites the same 1 % window in the middle, printing a checksum of the whole heap.
 * The output depends only on the arguments, not on timing. With "text" the heap holds
 * random letters a-p instead (four bits of entropy per byte: it compresses to about half).
 * With BURST, every iteration from BURST on rewrites the whole heap instead of the window
 * (a program that suddenly writes all of its memory).
 * Usage: churn MIB ITERS MS [random|text] [BURST] */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

int main(int argc, char **argv) {
  if (argc < 4 || argc > 6) {
    fprintf(stderr, "usage: churn MIB ITERS MS [random|text] [BURST]\n");
    return 2;
  }
  size_t n = (size_t)atol(argv[1]) << 20;
  int iters = atoi(argv[2]), ms = atoi(argv[3]);
  int text = argc >= 5 && !strcmp(argv[4], "text");
  int burst = argc == 6 ? atoi(argv[5]) : 0;
  uint64_t *m = malloc(n);
  if (!m) return 1;
  uint64_t x = 0x9E3779B97F4A7C15ull;
  for (size_t i = 0; i < n / 8; i++) {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    m[i] = text ? (x & 0x0f0f0f0f0f0f0f0full) + 0x6161616161616161ull : x;
  }
  size_t w0 = n / 16, wn = n / 800; /* words: the window is 1 % of the heap */
  for (int it = 1; it <= iters; it++) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, 0);
    int all = burst > 0 && it >= burst;
    for (size_t i = all ? 0 : w0; i < (all ? n / 8 : w0 + wn); i++) m[i] = m[i] * 6364136223846793005ull + it;
    uint64_t sum = 0;
    for (size_t i = 0; i < n / 8; i++) sum = sum * 31 + m[i];
    printf("iteration %d checksum %016llx\n", it, (unsigned long long)sum);
    fflush(stdout);
  }
  free(m);
  return 0;
}
