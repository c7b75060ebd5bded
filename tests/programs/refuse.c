/* Holds something the engine cannot checkpoint: "block" starts a thread that blocks every
 * signal with a raw system call (so it never stops), "io_uring" and "perf" and "bpf" open
 * such descriptors, "child" starts a child process, "traced" has a child trace it,
 * "handler" sets every real-time signal to be ignored with raw system calls (as Go's
 * runtime takes every signal), so the checkpoint signal no longer reaches the agent.
 * Prints READY, waits for a line, prints "still running". */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <linux/bpf.h>
#include <linux/perf_event.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/socket.h>
#include <sys/wait.h>
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
  const char *m = argc > 1 ? argv[1] : "";
  (void)sv;
  if (!strcmp(m, "block")) pthread_create(&t, NULL, blocker, NULL);
  if (!strcmp(m, "handler")) {
    struct { unsigned long handler, flags, restorer, mask; } ign = {(unsigned long)SIG_IGN, 0, 0, 0};
    for (int sig = 34; sig <= 64; sig++) syscall(SYS_rt_sigaction, sig, &ign, NULL, 8);
  }
  if (!strcmp(m, "io_uring")) {
    char params[512] = {0};
    if (syscall(425, 4, params) < 0) { perror("io_uring_setup"); return 3; }
  }
  if (!strcmp(m, "perf")) {
    struct perf_event_attr a;
    memset(&a, 0, sizeof a);
    a.type = PERF_TYPE_SOFTWARE; a.size = sizeof a; a.config = PERF_COUNT_SW_TASK_CLOCK; a.exclude_kernel = 1;
    if (syscall(SYS_perf_event_open, &a, 0, -1, -1, 0) < 0) { perror("perf_event_open"); return 3; }
  }
  if (!strcmp(m, "bpf")) {
    union bpf_attr a;
    memset(&a, 0, sizeof a);
    a.map_type = BPF_MAP_TYPE_ARRAY; a.key_size = 4; a.value_size = 4; a.max_entries = 1;
    if (syscall(SYS_bpf, BPF_MAP_CREATE, &a, sizeof a) < 0) { perror("bpf"); return 3; }
  }
  if (!strcmp(m, "child") && fork() == 0) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    sleep(30);
    _exit(0);
  }
  if (!strcmp(m, "traced")) {
    pid_t parent = getpid();
    if (fork() == 0) {
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (ptrace(PTRACE_SEIZE, parent, 0, 0) != 0) _exit(1);
      sleep(30);
      _exit(0);
    }
    usleep(200000);
  }
  printf("READY\n");
  char line[16];
  if (!fgets(line, sizeof line, stdin)) return 2;
  stop = 1;
  printf("still running\n");
  return 0;
}
