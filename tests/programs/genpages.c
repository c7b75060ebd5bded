/* For checkpoints taken while the program rewrites its memory: MIB (argv[1]) MiB of pages,
 * each page's first word a generation number. GENS (argv[2]) times, it walks every page,
 * checks that the word holds the generation it expects and adds one; a page from another
 * moment than the rest (an image not taken at one instant) fails the check: it prints
 * "BAD page P has V want G" and exits 1. Prints READY, "gen G" every 10 generations, then
 * "done". */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  size_t pages = (size_t)(argc > 1 ? atoi(argv[1]) : 64) << 8;
  uint64_t gens = argc > 2 ? strtoull(argv[2], NULL, 10) : 100;
  uint64_t *m = calloc(pages, 4096);
  if (!m) return 2;
  for (size_t p = 0; p < pages; p++)
    for (size_t i = 1; i < 512; i++) m[p * 512 + i] = p * 512 + i;
  printf("READY\n");
  for (uint64_t g = 0; g < gens; g++) {
    for (size_t p = 0; p < pages; p++) {
      if (m[p * 512] != g) {
        printf("BAD page %zu has %llu want %llu\n", p, (unsigned long long)m[p * 512], (unsigned long long)g);
        return 1;
      }
      m[p * 512] = g + 1;
    }
    if (g % 10 == 0) printf("gen %llu\n", (unsigned long long)g);
  }
  printf("done\n");
  return 0;
}
