/* sched_getcpu() (glibc reads it from the rseq area) must agree with the getcpu system
 * call after a restore, also after the thread moves to another CPU. Prints READY, waits for
 * a line on stdin, then moves between the allowed CPUs and compares. */
#define _GNU_SOURCE
#include <sched.h>
#include <stdio.h>
#include <sys/syscall.h>
#include <unistd.h>

static int sys_cpu(void) { unsigned c = 0; syscall(SYS_getcpu, &c, NULL, NULL); return (int)c; }

int main(void) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  cpu_set_t all;
  sched_getaffinity(0, sizeof all, &all);
  printf("READY\n");
  char line[16];
  if (!fgets(line, sizeof line, stdin)) return 2;
  int mismatches = 0, checks = 0;
  for (int round = 0; round < 20; round++) {
    for (int cpu = 0; cpu < CPU_SETSIZE && cpu < 64; cpu++) {
      if (!CPU_ISSET(cpu, &all)) continue;
      cpu_set_t one;
      CPU_ZERO(&one);
      CPU_SET(cpu, &one);
      if (sched_setaffinity(0, sizeof one, &one) != 0) continue;
      for (int k = 0; k < 100; k++) {
        int a = sched_getcpu(), b = sys_cpu();
        checks++;
        if (a != b) mismatches++;
      }
    }
  }
  sched_setaffinity(0, sizeof all, &all);
  printf("getcpu mismatches: %d (checked: %s)\n", mismatches, checks > 0 ? "yes" : "no");
  return 0;
}
