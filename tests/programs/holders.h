/* The handshake of the lock-holding test programs (rwlocks.c, mutexes.c): a holder thread
 * takes its locks, says so with holder_ready() and waits in holder_wait_go(); the main
 * thread runs it with run_holder(), which returns once it holds its locks, prints READY,
 * reads a line from stdin (the checkpoints and restores happen meanwhile), arms an alarm
 * so that a lock call that hangs ends the run, and lets the holder go on. */
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>

static pthread_mutex_t hs_m = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t hs_cv = PTHREAD_COND_INITIALIZER;
static int hs_held, hs_go;

static void holder_ready(void) {
  pthread_mutex_lock(&hs_m);
  hs_held = 1;
  pthread_cond_broadcast(&hs_cv);
  while (!hs_go) pthread_cond_wait(&hs_cv, &hs_m);
  pthread_mutex_unlock(&hs_m);
}

/* Returns 0, or 1 when stdin ended before the line. */
static int run_holder(pthread_t *t, void *(*holder)(void *)) {
  pthread_create(t, 0, holder, 0);
  pthread_mutex_lock(&hs_m);
  while (!hs_held) pthread_cond_wait(&hs_cv, &hs_m);
  pthread_mutex_unlock(&hs_m);
  printf("READY\n");
  char line[64];
  if (!fgets(line, sizeof line, stdin)) return 1;
  alarm(15);
  pthread_mutex_lock(&hs_m);
  hs_go = 1;
  pthread_cond_broadcast(&hs_cv);
  pthread_mutex_unlock(&hs_m);
  return 0;
}
