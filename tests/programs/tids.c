/* pthread_self()/gettid()-based code after a restore: each thread's pthread_self() and
 * thread-local data stay the same, pthread_kill() reaches the right thread (glibc uses the
 * kernel tid kept in the thread descriptor), pthread_join() works, and gettid() agrees with
 * the tid glibc holds. Prints READY, waits for a line on stdin. */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define N 3
static __thread int my_index = -1;
static pthread_t selves[N];
static volatile int hit_by[N];
static pthread_mutex_t m = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int go, ready_count;

static void on_usr1(int sig) { (void)sig; if (my_index >= 0) hit_by[my_index] = 1; }

static void *worker(void *arg) {
  my_index = (int)(long)arg;
  selves[my_index] = pthread_self();
  pthread_mutex_lock(&m);
  ready_count++;
  pthread_cond_broadcast(&cv);
  while (!go) pthread_cond_wait(&cv, &m);
  pthread_mutex_unlock(&m);
  int same_self = pthread_equal(selves[my_index], pthread_self());
  /* glibc 2.36 keeps the tid at a fixed offset in struct pthread; compare through
   * pthread_getattr_np-independent means: signal ourselves through pthread_kill. */
  hit_by[my_index] = 0;
  pthread_kill(pthread_self(), SIGUSR1);
  int self_signal = hit_by[my_index];
  return (void *)(long)(same_self * 10 + self_signal);
}

int main(void) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  signal(SIGUSR1, on_usr1);
  my_index = 99;
  pthread_t t[N];
  for (long i = 0; i < N; i++) pthread_create(&t[i], NULL, worker, (void *)i);
  pthread_mutex_lock(&m);
  while (ready_count < N) pthread_cond_wait(&cv, &m);
  pthread_mutex_unlock(&m);
  printf("READY\n");
  char line[16];
  if (!fgets(line, sizeof line, stdin)) return 2;
  printf("main tls kept: %d\n", my_index == 99);
  printf("main gettid is pid: %d\n", (pid_t)syscall(SYS_gettid) == getpid());
  pthread_mutex_lock(&m);
  go = 1;
  pthread_cond_broadcast(&cv);
  pthread_mutex_unlock(&m);
  for (int i = 0; i < N; i++) {
    void *r;
    int jr = pthread_join(t[i], &r);
    printf("thread %d: join %d same pthread_self %ld pthread_kill reached it %ld\n", i, jr, (long)r / 10, (long)r % 10);
  }
  return 0;
}
