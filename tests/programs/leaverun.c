/* For --leave-running: builds a table (argv[1] entries, default 1M), prints READY, waits
 * for a line, prints a result that depends on the table and the line. Both the original and a restored copy must print it. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  size_t n = argc > 1 ? (size_t)atol(argv[1]) : 1 << 20;
  unsigned *t = malloc(n * sizeof *t);
  for (size_t i = 0; i < n; i++) t[i] = (unsigned)(i * 2654435761u);
  printf("READY\n");
  char line[64];
  if (!fgets(line, sizeof line, stdin)) return 2;
  line[strcspn(line, "\n")] = 0;
  unsigned long sum = 0;
  for (size_t i = 0; i < n; i++) sum += t[i] ^ (unsigned)strlen(line);
  printf("result %s %lu\n", line, sum);
  return 0;
}
