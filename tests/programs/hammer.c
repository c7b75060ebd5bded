/* Threads hammering malloc/free and stdio while checkpoints are taken in a loop: the
 * engine must never deadlock on a lock a frozen thread holds. Prints READY; on the line
 * "stop" on stdin it stops the threads and prints a summary. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define T 4
static volatile int stop;
static long ops[T];
static FILE *sink;

static void *hammer(void *arg) {
  long id = (long)arg;
  unsigned seed = (unsigned)id * 7919u + 1;
  void *keep[64] = {0};
  while (!stop) {
    int k = rand_r(&seed) % 64;
    free(keep[k]);
    size_t sz = 16 + rand_r(&seed) % 8192;
    keep[k] = malloc(sz);
    memset(keep[k], (int)id, sz);
    fprintf(sink, "thread %ld op %ld size %zu\n", id, ops[id], sz);
    if (ops[id] % 1000 == 0) fflush(sink);
    ops[id]++;
  }
  for (int k = 0; k < 64; k++) free(keep[k]);
  return NULL;
}

int main(void) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  sink = fopen("/dev/null", "w");
  pthread_t t[T];
  for (long i = 0; i < T; i++) pthread_create(&t[i], NULL, hammer, (void *)i);
  usleep(50000);
  printf("READY\n");
  char line[16];
  while (fgets(line, sizeof line, stdin)) {
    if (!strncmp(line, "stop", 4)) break;
  }
  stop = 1;
  long total = 0;
  for (int i = 0; i < T; i++) { pthread_join(t[i], NULL); total += ops[i]; }
  printf("stopped: all %d threads made progress: %d\n", T, ops[0] > 0 && ops[1] > 0 && ops[2] > 0 && ops[3] > 0);
  fprintf(stderr, "total ops %ld\n", total);
  return 0;
}
