/* Regular files keep their offsets and flags across a checkpoint, and dup'ed descriptors
 * keep sharing one offset. Run in a scratch directory; prints READY, then waits for a line
 * on stdin. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static void show(const char *name, int fd) {
  int fl = fcntl(fd, F_GETFL), fdfl = fcntl(fd, F_GETFD);
  printf("%s: offset %ld acc %d append %d nonblock %d cloexec %d\n", name, (long)lseek(fd, 0, SEEK_CUR),
         fl & O_ACCMODE, !!(fl & O_APPEND), !!(fl & O_NONBLOCK), !!(fdfl & FD_CLOEXEC));
}

int main(void) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  FILE *f = fopen("input.txt", "w");
  for (int i = 0; i < 100; i++) fprintf(f, "line %03d\n", i);
  fclose(f);
  unlink("log.txt");
  int a = open("input.txt", O_RDONLY | O_CLOEXEC);
  int b = open("log.txt", O_WRONLY | O_APPEND | O_CREAT, 0644);
  int c = open("data.bin", O_RDWR | O_CREAT | O_TRUNC, 0644);
  int e = open("input.txt", O_RDONLY | O_NONBLOCK);
  char buf[64];
  read(a, buf, 18);
  write(b, "first\n", 6);
  char zeros[100];
  memset(zeros, 'z', sizeof zeros);
  write(c, zeros, sizeof zeros);
  lseek(c, 40, SEEK_SET);
  int d = dup(c);
  lseek(e, 9 * 50, SEEK_SET);
  show("a", a); show("b", b); show("c", c); show("d", d); show("e", e);
  printf("READY\n");
  char line[64];
  if (!fgets(line, sizeof line, stdin)) return 2;
  show("a", a); show("b", b); show("c", c); show("d", d); show("e", e);
  memset(buf, 0, sizeof buf);
  read(a, buf, 9);
  printf("a reads: %s", buf);
  memset(buf, 0, sizeof buf);
  read(e, buf, 9);
  printf("e reads: %s", buf);
  write(b, "second\n", 7);
  write(d, "X", 1);
  printf("c after write through d: offset %ld\n", (long)lseek(c, 0, SEEK_CUR));
  lseek(b, 0, SEEK_SET);
  int rb = open("log.txt", O_RDONLY);
  memset(buf, 0, sizeof buf);
  read(rb, buf, sizeof buf - 1);
  printf("log: %s", buf);
  return 0;
}
