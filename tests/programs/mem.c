/* A process of a given size for benchmarks: MIB mebibytes of random (xorshift) or zero
 * bytes (touched, so the pages are present). Prints READY, then waits for signals.
 * Usage: mem MIB [random|zero] */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  size_t n = (size_t)atol(argc > 1 ? argv[1] : "1") << 20;
  int zero = argc > 2 && !strcmp(argv[2], "zero");
  volatile unsigned long *q = malloc(n);
  unsigned long x = 88172645463325252UL;
  for (size_t i = 0; i < n / 8; i++) {
    if (zero) { q[i] = 1; q[i] = 0; continue; }
    x ^= x << 13; x ^= x >> 7; x ^= x << 17;
    q[i] = x;
  }
  printf("READY\n");
  for (;;) pause();
}
