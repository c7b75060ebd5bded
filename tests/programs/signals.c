/* The program's own signal handlers, signal mask and sigaltstack across a checkpoint.
 * Prints READY, then waits for a line on stdin (the checkpoint happens meanwhile). */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char *alt;
#define ALT_SIZE (64 * 1024)
static volatile sig_atomic_t usr1_on_alt, usr1_hits, usr2_hits;

static void on_usr1(int sig, siginfo_t *si, void *uc) {
  (void)sig; (void)si; (void)uc;
  char here;
  usr1_on_alt = (&here >= alt && &here < alt + ALT_SIZE);
  usr1_hits++;
}
static void on_usr2(int sig) { (void)sig; usr2_hits++; }

int main(void) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  alt = malloc(ALT_SIZE);
  stack_t ss = {.ss_sp = alt, .ss_size = ALT_SIZE, .ss_flags = 0};
  sigaltstack(&ss, NULL);
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = on_usr1;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigaction(SIGUSR1, &sa, NULL);
  signal(SIGUSR2, on_usr2);
  sigset_t block;
  sigemptyset(&block);
  sigaddset(&block, SIGUSR2);
  sigaddset(&block, SIGRTMAX - 3); /* the engine's signal: the agent must keep it usable */
  sigprocmask(SIG_BLOCK, &block, NULL);
  raise(SIGUSR1);
  printf("before: usr1 on altstack %d\n", (int)usr1_on_alt);
  printf("READY\n");
  char line[64];
  if (!fgets(line, sizeof line, stdin)) return 2;
  struct sigaction cur;
  sigaction(SIGUSR1, NULL, &cur);
  printf("handler kept: %d\n", cur.sa_sigaction == on_usr1 && (cur.sa_flags & SA_ONSTACK));
  sigset_t now;
  sigprocmask(SIG_SETMASK, NULL, &now);
  printf("SIGUSR2 still blocked: %d\n", sigismember(&now, SIGUSR2));
  stack_t cs;
  sigaltstack(NULL, &cs);
  printf("altstack kept: %d\n", cs.ss_sp == alt && cs.ss_size == ALT_SIZE && !(cs.ss_flags & SS_DISABLE));
  usr1_on_alt = 0;
  raise(SIGUSR1);
  printf("after: usr1 on altstack %d, hits %d\n", (int)usr1_on_alt, (int)usr1_hits);
  raise(SIGUSR2);
  sigset_t pend;
  sigpending(&pend);
  printf("SIGUSR2 pending while blocked: %d, delivered %d\n", sigismember(&pend, SIGUSR2), (int)usr2_hits);
  sigprocmask(SIG_UNBLOCK, &block, NULL);
  printf("SIGUSR2 delivered after unblock: %d\n", (int)usr2_hits);
  return 0;
}
