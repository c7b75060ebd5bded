/* The paper's test function: counts to 70, one step a second, POSTs {"count": i} to
 * URL/count at every multiple of 10 and {"result": 70} to URL/result at the end.
 * Usage: count URL [TO [INTERVAL_MS]]   (URL like http://127.0.0.1:8000) */
#include <arpa/inet.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static char host[256], port[16] = "80";

static int post(const char *path, const char *body) {
  struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *res;
  for (int attempt = 0; attempt < 5; attempt++) {
    if (getaddrinfo(host, port, &hints, &res) != 0) { sleep(1); continue; }
    int fd = socket(res->ai_family, SOCK_STREAM, 0);
    if (fd >= 0 && connect(fd, res->ai_addr, res->ai_addrlen) == 0) {
      char req[512];
      int n = snprintf(req, sizeof req,
                       "POST %s HTTP/1.1\r\nHost: %s:%s\r\nContent-Type: application/json\r\nContent-Length: %zu\r\nConnection: close\r\n\r\n%s",
                       path, host, port, strlen(body), body);
      int ok = write(fd, req, n) == n;
      char resp[256];
      ok = ok && read(fd, resp, sizeof resp) > 0;
      close(fd);
      freeaddrinfo(res);
      if (ok) return 0;
    } else if (fd >= 0) {
      close(fd);
    }
    freeaddrinfo(res);
    sleep(1);
  }
  fprintf(stderr, "count: cannot POST to %s:%s%s\n", host, port, path);
  return -1;
}

int main(int argc, char **argv) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  if (argc < 2 || strncmp(argv[1], "http://", 7)) { fprintf(stderr, "usage: count http://HOST:PORT [TO [INTERVAL_MS]]\n"); return 2; }
  int to = argc > 2 ? atoi(argv[2]) : 70, interval = argc > 3 ? atoi(argv[3]) : 1000;
  const char *h = argv[1] + 7;
  const char *colon = strchr(h, ':'), *slash = strchr(h, '/');
  size_t hl = colon ? (size_t)(colon - h) : slash ? (size_t)(slash - h) : strlen(h);
  snprintf(host, sizeof host, "%.*s", (int)hl, h);
  if (colon) snprintf(port, sizeof port, "%.*s", (int)(slash ? slash - colon - 1 : (long)strlen(colon + 1)), colon + 1);
  for (int i = 1; i <= to; i++) {
    usleep(interval * 1000);
    printf("count %d\n", i);
    if (i % 10 == 0) {
      char body[64];
      snprintf(body, sizeof body, "{\"count\": %d}", i);
      if (post("/count", body)) return 1;
    }
  }
  char body[64];
  snprintf(body, sizeof body, "{\"result\": %d}", to);
  if (post("/result", body)) return 1;
  printf("{\"result\": %d}\n", to);
  return 0;
}
