/* Reads all of stdin slowly, 4 KiB at a time with read(2), and prints how much it has
 * read and a hash of it every 256 KiB and at the end: its output depends on every byte
 * of the input and on nothing else. With MAX, it fails (status 3) once it has read more
 * than MAX bytes. Usage: sumin [DELAY_US per read, default 2000] [MAX]. */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  long delay = argc > 1 ? atol(argv[1]) : 2000;
  unsigned long long max = argc > 2 ? strtoull(argv[2], NULL, 10) : 0;
  unsigned long long h = 1469598103934665603ULL, n = 0, next = 256 << 10;
  unsigned char buf[4096];
  printf("READY\n");
  for (;;) {
    ssize_t k = read(0, buf, sizeof buf);
    if (k < 0) { perror("read"); return 1; }
    if (k == 0) break;
    for (ssize_t i = 0; i < k; i++) h = (h ^ buf[i]) * 1099511628211ULL;
    n += k;
    if (max && n > max) { printf("read %llu bytes, more than %llu\n", n, max); return 3; }
    if (n >= next) { printf("read %llu hash %016llx\n", n, h); next += 256 << 10; }
    usleep(delay);
  }
  printf("end %llu hash %016llx\n", n, h);
  return 0;
}
