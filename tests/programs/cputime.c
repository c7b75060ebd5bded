/* CPU time across restores: the main thread burns CPU until clock() says 1 s, reading the
 * process's CPU time four ways (clock, clock_gettime of the process CPU clock, getrusage
 * and times, user plus system) and its own two ways (CLOCK_THREAD_CPUTIME_ID and
 * RUSAGE_THREAD) all along, while a second thread reads its own the same way. A restore
 * must let every figure go on from where it was: none may go back (the new process's
 * clocks start from zero) or leap ahead (a figure counted twice). Then a thread created
 * after the restores (glibc may give it a finished thread's TLS block) and a forked child
 * must start from zero. Prints READY first and "ok" at the end, or what went wrong and
 * exits 1. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <sys/resource.h>
#include <sys/times.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

enum { N = 6, OWN = 4 };
static const char *names[N] = {"clock", "clock_gettime", "getrusage", "times", "thread clock_gettime", "RUSAGE_THREAD"};
static volatile int done;

static double figure(int how) {
  struct timespec ts;
  struct rusage r;
  struct tms t;
  switch (how) {
  case 0: return clock() / 1e6;
  case 1: clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts); return ts.tv_sec + ts.tv_nsec * 1e-9;
  case 2:
  case 5:
    getrusage(how == 2 ? RUSAGE_SELF : RUSAGE_THREAD, &r);
    return r.ru_utime.tv_sec + r.ru_stime.tv_sec + (r.ru_utime.tv_usec + r.ru_stime.tv_usec) * 1e-6;
  case 3: times(&t); return (t.tms_utime + t.tms_stime) / 100.0;
  default: clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts); return ts.tv_sec + ts.tv_nsec * 1e-9;
  }
}

/* Reads figures [from, N) until *stop; returns 0, or 1 after printing what went wrong. */
static int watch(int from, const char *who, volatile int *stop) {
  double last[N];
  for (int i = from; i < N; i++) last[i] = figure(i);
  /* Readings come microseconds apart; times() counts in 10 ms ticks. */
  const double leap = 0.05;
  while (!*stop) {
    for (int i = from; i < N; i++) {
      double now = figure(i);
      if (now < last[i] - 1e-6 || now > last[i] + leap) {
        printf("BAD %s: %s went from %.6f to %.6f\n", who, names[i], last[i], now);
        return 1;
      }
      last[i] = now;
    }
    if (from == 0 && last[0] >= 1.0) *stop = 1;
  }
  return 0;
}

static void *worker(void *arg) {
  (void)arg;
  return (void *)(long)watch(OWN, "the second thread", &done);
}

static void *fresh(void *arg) {
  (void)arg;
  return (void *)(long)(figure(OWN) < 0.05 && figure(OWN + 1) < 0.05 ? 0 : 1);
}

static long run(void *(*f)(void *)) {
  pthread_t t;
  void *r;
  pthread_create(&t, 0, f, 0);
  pthread_join(t, &r);
  return (long)r;
}

int main(void) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  run(fresh); /* leaves a finished thread's stack and TLS block for reuse */
  pthread_t w;
  pthread_create(&w, 0, worker, 0);
  printf("READY\n");
  int bad = watch(0, "the main thread", &done);
  done = 1;
  void *wr;
  pthread_join(w, &wr);
  if (bad || wr) return 1;
  if (run(fresh)) {
    printf("BAD a thread created after the restores did not start from zero\n");
    return 1;
  }
  pid_t c = fork();
  if (c == 0) _exit(clock() < 50000 ? 0 : 1);
  int st = 0;
  waitpid(c, &st, 0);
  if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
    printf("BAD a child's CPU time did not start from zero\n");
    return 1;
  }
  printf("ok\n");
  return 0;
}
