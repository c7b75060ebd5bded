/* Multi-threaded state across a checkpoint: 4 workers taking turns under a mutex and a
 * condition variable, a thread asleep in nanosleep, a thread blocked in read(2) on stdin,
 * and pthread_join of all of them after the restore. Results are printed by main in a
 * fixed order so the output does not depend on timing. Feed "hello" on stdin. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define WORKERS 4
#define ROUNDS 300
static pthread_mutex_t m = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int turn;
static long total;
static char got[64];
static int slept;

static void *worker(void *arg) {
  long id = (long)arg, mine = 0;
  for (int i = 0; i < ROUNDS; i++) {
    pthread_mutex_lock(&m);
    while (turn != id) pthread_cond_wait(&cv, &m);
    total += id * i;
    mine += i;
    turn = (turn + 1) % WORKERS;
    pthread_cond_broadcast(&cv);
    pthread_mutex_unlock(&m);
    if (i % 50 == 0) usleep(5000);
  }
  return (void *)mine;
}

static void *sleeper(void *arg) {
  (void)arg;
  struct timespec ts = {1, 500000000};
  nanosleep(&ts, NULL);
  slept = 1;
  return NULL;
}

static void *reader(void *arg) {
  (void)arg;
  ssize_t n = read(0, got, sizeof got - 1);
  if (n > 0) got[n] = 0;
  char *nl = strchr(got, '\n');
  if (nl) *nl = 0;
  return NULL;
}

int main(void) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  pthread_t w[WORKERS], s, r;
  for (long i = 0; i < WORKERS; i++) pthread_create(&w[i], NULL, worker, (void *)i);
  pthread_create(&s, NULL, sleeper, NULL);
  pthread_create(&r, NULL, reader, NULL);
  usleep(100000);
  printf("READY\n");
  for (int i = 0; i < WORKERS; i++) {
    void *res;
    pthread_join(w[i], &res);
    printf("worker %d: %ld\n", i, (long)res);
  }
  pthread_join(s, NULL);
  printf("sleeper woke: %d\n", slept);
  pthread_join(r, NULL);
  printf("reader got: %s\n", got);
  printf("total %ld\n", total);
  return 0;
}
