/* What locking costs a program: nanoseconds per putc on a FILE (stdio locks the FILE when
 * the process has more than one thread), per small malloc + free, and per lock + unlock
 * pair of a normal and of a recursive pthread mutex. Each figure is the fastest of three
 * passes. Prints one line: "putc P malloc M mutex N recursive R".
 * Usage: locks [wait]  (wait: print READY and read a line first, so that the program can
 * be checkpointed and restored before it measures). */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static double best(double a, double b) { return a < b ? a : b; }

int main(int argc, char **argv) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  pthread_mutex_t normal = PTHREAD_MUTEX_INITIALIZER, rec;
  pthread_mutexattr_t a;
  pthread_mutexattr_init(&a);
  pthread_mutexattr_settype(&a, PTHREAD_MUTEX_RECURSIVE);
  pthread_mutex_init(&rec, &a);
  FILE *f = fopen("/dev/null", "w");
  if (!f) return 1;
  if (argc > 1 && strcmp(argv[1], "wait") == 0) {
    printf("READY\n");
    char line[16];
    if (!fgets(line, sizeof line, stdin)) return 1;
  }
  double put = 1e9, mal = 1e9, mut = 1e9, rmut = 1e9;
  void *p[64] = {0};
  for (int pass = 0; pass < 3; pass++) {
    long n = 20000000;
    double t = now();
    for (long i = 0; i < n; i++) putc('x', f);
    put = best(put, (now() - t) / n * 1e9);
    n = 10000000;
    t = now();
    for (long i = 0; i < n; i++) {
      int k = i & 63;
      free(p[k]);
      p[k] = malloc(16 + (i * 37) % 1000);
    }
    mal = best(mal, (now() - t) / n * 1e9);
    n = 20000000;
    t = now();
    for (long i = 0; i < n; i++) {
      pthread_mutex_lock(&normal);
      pthread_mutex_unlock(&normal);
    }
    mut = best(mut, (now() - t) / n * 1e9);
    t = now();
    for (long i = 0; i < n; i++) {
      pthread_mutex_lock(&rec);
      pthread_mutex_unlock(&rec);
    }
    rmut = best(rmut, (now() - t) / n * 1e9);
  }
  printf("putc %.2f malloc %.2f mutex %.2f recursive %.2f\n", put, mal, mut, rmut);
  return 0;
}
