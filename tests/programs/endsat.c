/* Sleeps MS milliseconds (in small naps, so that a checkpoint can land anywhere in it),
 * prints "done" and exits: for racing a program's end against a checkpoint. */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static long now_ms(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

int main(int argc, char **argv) {
  long ms = argc > 1 ? atol(argv[1]) : 700, end = now_ms() + ms;
  while (now_ms() < end) usleep(2000);
  printf("done\n");
  return 0;
}
