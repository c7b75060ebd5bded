/* Starts three children that end at once (exit 7, SIGKILL, exit 3), lets them become
 * zombies without reaping them, prints READY and waits for a line on stdin; then reaps
 * them with waitpid, wait and waitid (WNOWAIT first), and checks that no child is left. */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

static pid_t child(int how) {
  pid_t p = fork();
  if (p == 0) {
    if (how < 0) raise(-how);
    _exit(how);
  }
  return p;
}

static void show(const char *via, pid_t got, pid_t want, int st) {
  if (WIFEXITED(st)) printf("%s: exited %d, same pid: %s\n", via, WEXITSTATUS(st), got == want ? "yes" : "no");
  else if (WIFSIGNALED(st)) printf("%s: killed by %d, same pid: %s\n", via, WTERMSIG(st), got == want ? "yes" : "no");
  else printf("%s: status %#x\n", via, st);
}

int main(void) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  pid_t a = child(7), b = child(-SIGKILL), c = child(3);
  siginfo_t si;
  /* Until each has ended, without reaping it. */
  for (int i = 0; i < 3; i++) waitid(P_PID, (id_t)(i == 0 ? a : i == 1 ? b : c), &si, WEXITED | WNOWAIT);
  printf("READY\n");
  char line[16];
  if (!fgets(line, sizeof line, stdin)) return 1;
  int st = 0;
  pid_t got = waitpid(a, &st, 0);
  show("waitpid", got, a, st);
  got = wait(&st);
  show("wait", got, b, st);
  si.si_pid = 0;
  if (waitid(P_PID, (id_t)c, &si, WEXITED | WNOWAIT) == 0)
    printf("waitid nowait: pid same: %s, code %d, status %d\n", si.si_pid == c ? "yes" : "no", si.si_code, si.si_status);
  si.si_pid = 0;
  if (waitid(P_ALL, 0, &si, WEXITED) == 0)
    printf("waitid: pid same: %s, code %d, status %d\n", si.si_pid == c ? "yes" : "no", si.si_code, si.si_status);
  errno = 0;
  got = waitpid(-1, &st, WNOHANG);
  printf("then: %d %s\n", (int)got, errno == ECHILD ? "ECHILD" : "?");
  return 0;
}
