/* Read-write locks held for writing across checkpoints. A worker thread holds `a` for
 * writing, the main thread holds `b` for writing, and a second lock `r` is held for
 * reading; it prints READY and waits for a line on stdin (the checkpoints and restores
 * happen there). Then each holder asks for its own lock again (glibc answers EDEADLK
 * without waiting, which OpenSSL 3 relies on) and releases it, and other threads must then
 * get every lock: with the holder's tid gone stale, an unlock would leave a lock held for
 * ever and the next lock call would hang (an alarm ends such a run: holders.h). */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include "holders.h"

static pthread_rwlock_t a = PTHREAD_RWLOCK_INITIALIZER, b = PTHREAD_RWLOCK_INITIALIZER, r = PTHREAD_RWLOCK_INITIALIZER;

static const char *name(int e) { return e == 0 ? "ok" : e == EDEADLK ? "EDEADLK" : e == EBUSY ? "EBUSY" : strerror(e); }

static void *holder(void *arg) {
  (void)arg;
  pthread_rwlock_wrlock(&a);
  pthread_rwlock_rdlock(&r);
  holder_ready();
  printf("worker: rdlock of its own write lock: %s\n", name(pthread_rwlock_rdlock(&a)));
  printf("worker: wrlock of its own write lock: %s\n", name(pthread_rwlock_wrlock(&a)));
  printf("worker: unlock: %s\n", name(pthread_rwlock_unlock(&a)));
  printf("worker: unlock of its read lock: %s\n", name(pthread_rwlock_unlock(&r)));
  return 0;
}

static void *other(void *arg) {
  pthread_rwlock_t *l = arg;
  printf("other thread: wrlock: %s\n", name(pthread_rwlock_wrlock(l)));
  printf("other thread: unlock: %s\n", name(pthread_rwlock_unlock(l)));
  return 0;
}

int main(void) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  pthread_t w, o;
  pthread_rwlock_wrlock(&b);
  if (run_holder(&w, holder)) return 1;
  pthread_join(w, 0);
  printf("main: trywrlock of a: %s\n", name(pthread_rwlock_trywrlock(&a)));
  printf("main: unlock of a: %s\n", name(pthread_rwlock_unlock(&a)));
  printf("main: wrlock of r: %s\n", name(pthread_rwlock_wrlock(&r)));
  printf("main: unlock of r: %s\n", name(pthread_rwlock_unlock(&r)));
  printf("main: tryrdlock of its own write lock: %s\n", name(pthread_rwlock_tryrdlock(&b)));
  printf("main: unlock of b: %s\n", name(pthread_rwlock_unlock(&b)));
  pthread_create(&o, 0, other, &b);
  pthread_join(o, 0);
  printf("done\n");
  return 0;
}
