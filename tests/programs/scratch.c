/* Files a program writes in a scratch directory, and a log it keeps open for writing,
 * across a checkpoint after which they are gone (a fresh container's /tmp is empty).
 * Prints READY, waits for a line on stdin, then reads everything back. */
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

int main(void) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  mkdir("scratch", 0755);
  mkdir("scratch/sub", 0700);
  FILE *f = fopen("scratch/a.txt", "w");
  for (int i = 0; i < 50000; i++) fprintf(f, "row %d\n", i);
  fclose(f);
  symlink("a.txt", "scratch/link");
  int log = open("written.log", O_WRONLY | O_CREAT | O_TRUNC | O_APPEND, 0640);
  write(log, "before\n", 7);
  printf("READY\n");
  char line[16];
  if (!fgets(line, sizeof line, stdin)) return 2;
  f = fopen("scratch/a.txt", "r");
  long rows = 0;
  char buf[64];
  while (fgets(buf, sizeof buf, f)) rows++;
  fclose(f);
  char target[32] = {0};
  readlink("scratch/link", target, sizeof target - 1);
  struct stat st;
  int sub = stat("scratch/sub", &st) == 0 && S_ISDIR(st.st_mode) ? (int)(st.st_mode & 0777) : -1;
  write(log, "after\n", 6);
  int r = open("written.log", O_RDONLY);
  memset(buf, 0, sizeof buf);
  read(r, buf, sizeof buf - 1);
  printf("rows %ld link %s sub %o\nlog:\n%s", rows, target, sub, buf);
  return 0;
}
