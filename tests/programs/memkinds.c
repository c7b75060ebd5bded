/* Memory area kinds across a checkpoint: a MAP_SHARED file mapping (writes after the
 * restore still reach the file), a private file mapping with a changed page, a PROT_NONE
 * reservation, PROT_NONE memory that still holds data, and guard pages
 * (MADV_GUARD_INSTALL, Linux 6.13+) in the middle of an anonymous area. Prints READY,
 * waits for a line on stdin, then checks. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#ifndef MADV_GUARD_INSTALL
#define MADV_GUARD_INSTALL 102
#endif

static sigjmp_buf jb;
static void on_segv(int s) { (void)s; siglongjmp(jb, 1); }

/* 1 if reading p faults. */
static int faults(volatile char *p) {
  if (sigsetjmp(jb, 1)) return 1;
  (void)*p;
  return 0;
}

int main(void) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  struct sigaction sa = {0};
  sa.sa_handler = on_segv;
  sigaction(SIGSEGV, &sa, NULL);
  sigaction(SIGBUS, &sa, NULL);
  long pg = 4096;

  int fd = open("shared.dat", O_RDWR | O_CREAT | O_TRUNC, 0600);
  ftruncate(fd, 4 * pg);
  char *sh = mmap(NULL, 4 * pg, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  strcpy(sh + pg, "before checkpoint");

  int pf = open("private.dat", O_RDWR | O_CREAT | O_TRUNC, 0600);
  char fill[3 * 4096];
  memset(fill, 'f', sizeof fill);
  write(pf, fill, sizeof fill);
  char *pr = mmap(NULL, 3 * pg, PROT_READ | PROT_WRITE, MAP_PRIVATE, pf, 0);
  strcpy(pr + pg, "private change");

  char *res = mmap(NULL, 16 * pg, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  char *hidden = mmap(NULL, 2 * pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  strcpy(hidden + pg, "data under PROT_NONE");
  mprotect(hidden, 2 * pg, PROT_NONE);

  char *g = mmap(NULL, 8 * pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  for (int i = 0; i < 8; i++) g[i * pg] = 'a' + i;
  int guards = madvise(g + 3 * pg, 2 * pg, MADV_GUARD_INSTALL) == 0;
  if (!guards) fprintf(stderr, "memkinds: MADV_GUARD_INSTALL is not available here\n");

  printf("READY\n");
  char line[16];
  if (!fgets(line, sizeof line, stdin)) return 2;

  printf("shared mapping: %s\n", sh + pg);
  strcpy(sh + 2 * pg, "written after restore");
  msync(sh, 4 * pg, MS_SYNC);
  char buf[64] = {0};
  pread(fd, buf, 21, 2 * pg);
  printf("file reads the write: %s\n", buf);
  printf("private mapping: %s, untouched page %c, file page %c\n", pr + pg, pr[0], pr[2 * pg]);
  memset(buf, 0, sizeof buf);
  pread(pf, buf, 10, pg);
  printf("private file unchanged: %s\n", buf);
  printf("reservation faults: %d %d\n", faults(res), faults(res + 15 * pg));
  printf("hidden faults: %d\n", faults(hidden + pg));
  mprotect(hidden, 2 * pg, PROT_READ);
  printf("hidden data: %s\n", hidden + pg);
  if (guards) {
    for (int i = 0; i < 8; i++) {
      int f = faults(g + i * pg);
      printf("guard area page %d: %s\n", i, f ? "faults" : (char[]){g[i * pg], 0});
    }
  } else {
    printf("guard area: not tested\n");
  }
  return 0;
}
