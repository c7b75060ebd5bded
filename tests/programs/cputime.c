/* The process's CPU time across restores: burns CPU until clock() says 1 s, reading its CPU
 * time four ways all along (clock, clock_gettime of the process CPU clock, getrusage and
 * times, user plus system). A restore must let every figure go on from where it was: none
 * may go back (the new process's clocks start from zero) or leap ahead (a figure counted
 * twice). Then a forked child's CPU time must start from zero. Prints READY first and
 * "ok" at the end, or what went wrong and exits 1. */
#include <stdio.h>
#include <sys/resource.h>
#include <sys/times.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double figure(int how) {
  struct timespec ts;
  struct rusage r;
  struct tms t;
  switch (how) {
  case 0: return clock() / 1e6;
  case 1: clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts); return ts.tv_sec + ts.tv_nsec * 1e-9;
  case 2:
    getrusage(RUSAGE_SELF, &r);
    return r.ru_utime.tv_sec + r.ru_stime.tv_sec + (r.ru_utime.tv_usec + r.ru_stime.tv_usec) * 1e-6;
  default: times(&t); return (t.tms_utime + t.tms_stime) / 100.0;
  }
}

int main(void) {
  static const char *names[] = {"clock", "clock_gettime", "getrusage", "times"};
  setvbuf(stdout, NULL, _IOLBF, 0);
  printf("READY\n");
  double last[4];
  for (int i = 0; i < 4; i++) last[i] = figure(i);
  /* Readings come microseconds apart; times() counts in 10 ms ticks. */
  const double leap = 0.05;
  while (last[0] < 1.0) {
    for (int i = 0; i < 4; i++) {
      double now = figure(i);
      if (now < last[i] - 1e-6 || now > last[i] + leap) {
        printf("BAD %s went from %.6f to %.6f\n", names[i], last[i], now);
        return 1;
      }
      last[i] = now;
    }
  }
  /* A child is a new process: its CPU time starts from zero, not from the parent's. */
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
