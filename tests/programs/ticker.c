/* A job that runs for a while (two threads and the main thread counting), for chains of
 * checkpoint -> restore. With "both", each tick line also goes to stderr (as "tock").
 * Usage: ticker TICKS [both] (10 ms each). */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static volatile long a, b;
static int ticks;
static void *count_a(void *x) { (void)x; for (int i = 0; i < ticks; i++) { a += i; usleep(10000); } return NULL; }
static void *count_b(void *x) { (void)x; for (int i = 0; i < ticks; i++) { b += 2 * i; usleep(10000); } return NULL; }

int main(int argc, char **argv) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  ticks = argc > 1 ? atoi(argv[1]) : 300;
  int both = argc > 2 && !strcmp(argv[2], "both");
  pthread_t x, y;
  pthread_create(&x, NULL, count_a, NULL);
  pthread_create(&y, NULL, count_b, NULL);
  printf("READY\n");
  for (int i = 0; i < ticks; i++) {
    if (i % 25 == 0) printf("tick %d\n", i);
    if (i % 25 == 0 && both) fprintf(stderr, "tock %d\n", i);
    usleep(10000);
  }
  pthread_join(x, NULL);
  pthread_join(y, NULL);
  printf("a %ld b %ld\n", a, b);
  return 0;
}
