/* Holds something the engine cannot checkpoint yet: "socket" opens a socketpair, "block"
 * starts a thread that blocks every signal with a raw system call (so it never stops).
 * Prints READY, waits for a line, prints "still running". */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

static volatile int stop;
static void *blocker(void *x) {
  (void)x;
  unsigned long all = ~0UL;
  syscall(SYS_rt_sigprocmask, SIG_BLOCK, &all, NULL, 8);
  while (!stop) usleep(1000);
  return NULL;
}

int main(int argc, char **argv) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  int sv[2];
  pthread_t t;
  if (argc > 1 && !strcmp(argv[1], "socket")) socketpair(AF_UNIX, SOCK_STREAM, 0, sv);
  if (argc > 1 && !strcmp(argv[1], "block")) pthread_create(&t, NULL, blocker, NULL);
  printf("READY\n");
  char line[16];
  if (!fgets(line, sizeof line, stdin)) return 2;
  stop = 1;
  printf("still running\n");
  return 0;
}
