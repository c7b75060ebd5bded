/* For the snapshot checkpoint: a program with its own SIGCHLD handler and wait loop, and
 * no children. Prints READY, then polls waitpid(-1, WNOHANG) and wait() until a line comes
 * on stdin, and prints what it saw: neither the handler nor a wait may ever see the
 * agent's snapshot child. */
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static volatile sig_atomic_t got;

static void on_chld(int s) { (void)s; got++; }

int main(void) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_chld;
  sigaction(SIGCHLD, &sa, NULL);
  printf("READY\n");
  int waited = 0, other = 0, loops = 0;
  for (;;) {
    int st;
    pid_t r = waitpid(-1, &st, WNOHANG);
    if (r > 0) waited++;
    else if (r < 0 && errno != ECHILD) other++;
    r = wait(&st);
    if (r > 0) waited++;
    else if (r < 0 && errno != ECHILD && errno != EINTR) other++;
    loops++;
    struct pollfd p = {0, POLLIN, 0};
    if (poll(&p, 1, 1) > 0) break;
  }
  printf("sigchld %d waited %d other-errors %d looped %d\n", (int)got, waited, other, loops > 10);
  return 0;
}
