/* Sockets across a checkpoint: a TCP listener (bound and listening again after the
 * restore), a connection to it that is open at the checkpoint (closed after the restore:
 * the program sees EOF and reconnects), and a bound UDP socket (bound again).
 * Usage: sockets PORT [serve] — with "serve" it only serves, for --wait-idle tests.
 * Prints READY, waits for a line on stdin, then checks. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static int port;

static void *server(void *x) {
  int l = (int)(long)x;
  for (;;) {
    int s = accept(l, NULL, NULL);
    if (s < 0) continue;
    char buf[64] = {0};
    ssize_t n = read(s, buf, sizeof buf - 1);
    if (n > 0) {
      char out[96];
      int k = snprintf(out, sizeof out, "hello %s", buf);
      write(s, out, k);
    }
    close(s);
  }
  return NULL;
}

static int connect_local(void) {
  int c = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port), .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  return connect(c, (struct sockaddr *)&a, sizeof a) == 0 ? c : -1;
}

int main(int argc, char **argv) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  signal(SIGPIPE, SIG_IGN);
  port = atoi(argv[1]);
  int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
  setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port), .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  if (bind(l, (struct sockaddr *)&a, sizeof a) || listen(l, 16)) { perror("listen"); return 1; }
  pthread_t t;
  pthread_create(&t, NULL, server, (void *)(long)l);
  int u = socket(AF_INET, SOCK_DGRAM, 0);
  struct sockaddr_in ua = a;
  ua.sin_port = htons(port + 1);
  bind(u, (struct sockaddr *)&ua, sizeof ua);
  int c = argc > 2 ? -1 : connect_local();
  printf("READY\n");
  char line[16];
  if (!fgets(line, sizeof line, stdin)) return 2;
  if (c >= 0) {
    char buf[16];
    ssize_t n = read(c, buf, sizeof buf);
    printf("old connection after restore: %s\n", n == 0 ? "closed (EOF)" : n < 0 ? "error" : "data");
    close(c);
  }
  c = connect_local();
  write(c, "again", 5);
  char buf[64] = {0};
  read(c, buf, sizeof buf - 1);
  printf("new connection: %s\n", buf);
  struct sockaddr_in got;
  socklen_t gl = sizeof got;
  getsockname(u, (struct sockaddr *)&got, &gl);
  printf("udp bound again: %d\n", ntohs(got.sin_port) == port + 1);
  return 0;
}
