/* Mutexes that name their owner by tid, held across checkpoints: recursive, error-checking
 * and robust ones, a C11 recursive mtx_t, and a recursive mutex that its holder then waits
 * on with pthread_cond_timedwait. A worker thread and the main thread hold them; the
 * program prints READY and waits for a line on stdin (the checkpoints and restores happen
 * there). Then each holder locks its mutexes again (recursive: granted; error-checking:
 * EDEADLK) and unlocks them, and another thread must then get every one. With the holder's
 * tid gone stale, glibc would refuse the unlock (EPERM) and leave the mutex held for ever,
 * and a recursive lock by the holder would wait for itself. No call can hang the test: the
 * waits are timed, and an alarm ends a stuck run (holders.h).
 *
 * Last, a thread waiting in pthread_cond_wait is cancelled: its cleanup handler runs and
 * releases the mutex (the agent's wrapper must let the cancellation unwind through it). */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <threads.h>
#include <time.h>
#include <unistd.h>
#include "holders.h"

enum { REC, ERR, ROB, ROB_ERR, CV_REC, MAIN_REC, MAIN_ERR, N };
static const char *names[N] = {"recursive", "error-checking", "robust", "robust error-checking",
                               "recursive, waited on", "main's recursive", "main's error-checking"};
static pthread_mutex_t mx[N];
static mtx_t c11;
static pthread_mutex_t m = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv2 = PTHREAD_COND_INITIALIZER;

static const char *name(int e) {
  return e == 0 ? "ok" : e == EDEADLK ? "EDEADLK" : e == EBUSY ? "EBUSY" : e == ETIMEDOUT ? "ETIMEDOUT" : e == EPERM ? "EPERM" : strerror(e);
}

static struct timespec after_ms(long ms) {
  struct timespec t;
  clock_gettime(CLOCK_REALTIME, &t);
  t.tv_nsec += ms * 1000000;
  t.tv_sec += t.tv_nsec / 1000000000;
  t.tv_nsec %= 1000000000;
  return t;
}

static void init(int i, int type, int robust) {
  pthread_mutexattr_t a;
  pthread_mutexattr_init(&a);
  pthread_mutexattr_settype(&a, type);
  if (robust) pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
  pthread_mutex_init(&mx[i], &a);
  pthread_mutexattr_destroy(&a);
}

static void *holder(void *arg) {
  (void)arg;
  pthread_mutex_lock(&mx[REC]);
  pthread_mutex_lock(&mx[REC]);
  pthread_mutex_lock(&mx[ERR]);
  pthread_mutex_lock(&mx[ROB]);
  pthread_mutex_lock(&mx[ROB_ERR]);
  pthread_mutex_lock(&mx[CV_REC]);
  mtx_lock(&c11);
  holder_ready();
  struct timespec t = after_ms(3000);
  printf("worker: trylock of the recursive one: %s\n", name(pthread_mutex_trylock(&mx[REC])));
  printf("worker: timedlock of the recursive one: %s\n", name(pthread_mutex_timedlock(&mx[REC], &t)));
  printf("worker: timedlock of the error-checking one: %s\n", name(pthread_mutex_timedlock(&mx[ERR], &t)));
  printf("worker: lock of the robust error-checking one: %s\n", name(pthread_mutex_lock(&mx[ROB_ERR])));
  for (int i = 0; i < 4; i++) printf("worker: unlock of the recursive one: %s\n", name(pthread_mutex_unlock(&mx[REC])));
  printf("worker: unlock of the error-checking one: %s\n", name(pthread_mutex_unlock(&mx[ERR])));
  printf("worker: unlock of the robust one: %s\n", name(pthread_mutex_unlock(&mx[ROB])));
  printf("worker: unlock of the robust error-checking one: %s\n", name(pthread_mutex_unlock(&mx[ROB_ERR])));
  struct timespec soon = after_ms(50);
  printf("worker: timed wait on the recursive one: %s\n", name(pthread_cond_timedwait(&cv2, &mx[CV_REC], &soon)));
  printf("worker: unlock of it: %s\n", name(pthread_mutex_unlock(&mx[CV_REC])));
  printf("worker: C11 mtx_trylock: %s\n", mtx_trylock(&c11) == thrd_success ? "ok" : "failed");
  printf("worker: C11 mtx_unlock twice: %s\n", mtx_unlock(&c11) == thrd_success && mtx_unlock(&c11) == thrd_success ? "ok" : "failed");
  return 0;
}

static void *other(void *arg) {
  (void)arg;
  for (int i = 0; i < N; i++) {
    struct timespec t = after_ms(3000);
    int e = pthread_mutex_timedlock(&mx[i], &t);
    printf("other thread: %s: %s", names[i], name(e));
    if (e == 0) printf(", unlock: %s", name(pthread_mutex_unlock(&mx[i])));
    printf("\n");
  }
  struct timespec t = after_ms(3000);
  printf("other thread: C11: %s\n", mtx_timedlock(&c11, &t) == thrd_success && mtx_unlock(&c11) == thrd_success ? "ok" : "failed");
  return 0;
}

static void unlock_m(void *arg) { pthread_mutex_unlock(arg); }

static void *waiter(void *arg) {
  (void)arg;
  pthread_mutex_lock(&m);
  pthread_cleanup_push(unlock_m, &m);
  for (;;) pthread_cond_wait(&cv2, &m);
  pthread_cleanup_pop(1);
  return 0;
}

int main(void) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  init(REC, PTHREAD_MUTEX_RECURSIVE, 0);
  init(ERR, PTHREAD_MUTEX_ERRORCHECK, 0);
  init(ROB, PTHREAD_MUTEX_NORMAL, 1);
  init(ROB_ERR, PTHREAD_MUTEX_ERRORCHECK, 1);
  init(CV_REC, PTHREAD_MUTEX_RECURSIVE, 0);
  init(MAIN_REC, PTHREAD_MUTEX_RECURSIVE, 0);
  init(MAIN_ERR, PTHREAD_MUTEX_ERRORCHECK, 0);
  mtx_init(&c11, mtx_plain | mtx_recursive);
  pthread_t w, o, c;
  pthread_mutex_lock(&mx[MAIN_REC]);
  pthread_mutex_lock(&mx[MAIN_ERR]);
  if (run_holder(&w, holder)) return 1;
  pthread_join(w, 0);
  printf("main: lock of its recursive one: %s\n", name(pthread_mutex_lock(&mx[MAIN_REC])));
  printf("main: lock of its error-checking one: %s\n", name(pthread_mutex_lock(&mx[MAIN_ERR])));
  printf("main: unlocks: %s %s %s\n", name(pthread_mutex_unlock(&mx[MAIN_REC])), name(pthread_mutex_unlock(&mx[MAIN_REC])),
         name(pthread_mutex_unlock(&mx[MAIN_ERR])));
  pthread_create(&o, 0, other, 0);
  pthread_join(o, 0);
  pthread_create(&c, 0, waiter, 0);
  usleep(100000);
  pthread_cancel(c);
  void *ret;
  pthread_join(c, &ret);
  printf("cancelled in pthread_cond_wait: %s\n", ret == PTHREAD_CANCELED ? "yes" : "no");
  struct timespec t = after_ms(3000);
  printf("main: the waiter's mutex afterwards: %s\n", name(pthread_mutex_timedlock(&m, &t)));
  printf("done\n");
  return 0;
}
