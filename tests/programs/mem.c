/* A process of a given size for benchmarks: MIB mebibytes of random (xorshift), zero
 * (touched, so the pages are present) or text-like bytes (random letters from a-p: four
 * bits of entropy per byte, so they compress to about half). Prints READY, then waits for
 * signals.
 * Usage: mem MIB [random|zero|text] [tick]
 * With "tick" it wakes every millisecond instead and measures the longest gap between two
 * wake-ups (how long it was stopped, as the program itself sees it); on SIGTERM it prints
 * "max-gap-ms G" and exits. Without it, on SIGUSR1 it writes one byte of every page (its
 * first write after a `restore --map` copies the page) and prints "touched-ms T", the time
 * that took; on SIGUSR2 it reads one word of every page and prints "read-ms T". */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t stop;

static void on_term(int s) { (void)s; stop = 1; }

static volatile sig_atomic_t touch;

static void on_touch(int s) { touch = s == SIGUSR1 ? 1 : 2; }

static double now_ms(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

int main(int argc, char **argv) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  size_t n = (size_t)atol(argc > 1 ? argv[1] : "1") << 20;
  int zero = argc > 2 && !strcmp(argv[2], "zero");
  int text = argc > 2 && !strcmp(argv[2], "text");
  int tick = argc > 3 && !strcmp(argv[3], "tick");
  volatile unsigned long *q = malloc(n);
  unsigned long x = 88172645463325252UL;
  for (size_t i = 0; i < n / 8; i++) {
    if (zero) { q[i] = 1; q[i] = 0; continue; }
    x ^= x << 13; x ^= x >> 7; x ^= x << 17;
    q[i] = text ? (x & 0x0f0f0f0f0f0f0f0fUL) + 0x6161616161616161UL : x;
  }
  if (tick) signal(SIGTERM, on_term);
  else {
    signal(SIGUSR1, on_touch);
    signal(SIGUSR2, on_touch);
  }
  printf("READY\n");
  if (!tick) {
    for (;;) {
      pause();
      if (!touch) continue;
      int write = touch == 1;
      touch = 0;
      double t0 = now_ms();
      for (size_t i = 0; i < n / 8; i += 512) {
        if (write) q[i] += 1;
        else (void)q[i]; /* a volatile read: it happens */
      }
      printf("%s-ms %.1f\n", write ? "touched" : "read", now_ms() - t0);
    }
  }
  double last = now_ms(), gap = 0;
  struct timespec ms = {0, 1000000};
  while (!stop) {
    nanosleep(&ms, NULL);
    double t = now_ms();
    if (t - last > gap) gap = t - last;
    last = t;
  }
  printf("max-gap-ms %.1f\n", gap);
  return 0;
}
