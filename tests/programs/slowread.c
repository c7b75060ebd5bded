/* Reads stdin only a while after READY, so that input sent meanwhile is still unread in
 * the pipe when a checkpoint is taken; echoes each line. */
#include <stdio.h>
#include <string.h>
#include <unistd.h>

int main(void) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  printf("READY\n");
  sleep(1);
  char line[128];
  while (fgets(line, sizeof line, stdin)) {
    line[strcspn(line, "\n")] = 0;
    printf("echo: %s\n", line);
  }
  printf("eof\n");
  return 0;
}
