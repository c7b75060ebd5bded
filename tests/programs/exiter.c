/* Exits with the status given, or kills itself with SIGKILL ("kill"), or ("thread") ends
 * its main thread with pthread_exit while a second thread prints and returns: the process
 * then ends with status 0 when that thread does. "single" prints whether glibc takes the
 * process for single-threaded (its locks are then cheap: the agent's thread must not
 * change that). */
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/single_threaded.h>
#include <unistd.h>

static void *last(void *arg) {
  (void)arg;
  usleep(100000);
  printf("the last thread ends\n");
  fflush(stdout);
  return 0;
}

int main(int argc, char **argv) {
  if (argc > 1 && !strcmp(argv[1], "kill")) kill(getpid(), SIGKILL);
  if (argc > 1 && !strcmp(argv[1], "thread")) {
    pthread_t t;
    pthread_create(&t, 0, last, 0);
    pthread_exit(0);
  }
  if (argc > 1 && !strcmp(argv[1], "single")) {
    printf("single-threaded: %d\n", (int)__libc_single_threaded);
    return 0;
  }
  return argc > 1 ? atoi(argv[1]) : 0;
}
