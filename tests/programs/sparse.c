/* Memory with many separate runs of pages: every other page of a 32 MiB area holds data
 * (4096 runs), more than the kernel's PAGEMAP_SCAN buffers at once (512), as in Ruby's
 * heap. Prints READY, waits for a line, then checks every page: a written page holds its
 * index in every word, the others read as zero. Prints "ok" with the count, or the first
 * bad page and exits 1. */
#include <stdint.h>
#include <stdio.h>
#include <sys/mman.h>

#define PAGES 8192

int main(void) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  uint64_t *m = mmap(0, PAGES * 4096UL, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (m == MAP_FAILED) return 2;
  for (uint64_t p = 0; p < PAGES; p += 2)
    for (int w = 0; w < 512; w++) m[p * 512 + w] = p + 1;
  printf("READY\n");
  char line[16];
  if (!fgets(line, sizeof line, stdin)) return 1;
  for (uint64_t p = 0; p < PAGES; p++)
    for (int w = 0; w < 512; w++)
      if (m[p * 512 + w] != (p % 2 ? 0 : p + 1)) {
        printf("BAD page %llu word %d holds %llu\n", (unsigned long long)p, w, (unsigned long long)m[p * 512 + w]);
        return 1;
      }
  printf("ok: %d pages written, %d untouched\n", PAGES / 2, PAGES / 2);
  return 0;
}
