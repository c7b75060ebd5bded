/* Anonymous memory as `restore --map` maps it from an image: MIB (argv[1]) MiB from mmap,
 * every byte a function of its place. Prints READY, then does one step per line of stdin:
 *   check    sums the memory (every byte as it was filled);
 *   write    adds 1 to the first byte of every 7th page, then sums;
 *   discard  MADV_DONTNEED on the first 64 pages (they must read as zeros), MADV_FREE on
 *            the next 64 (it must succeed), munmap and a fresh mmap of the next 64 (zeros),
 *            then moves 16 pages elsewhere with mremap, discards them there (zeros) and
 *            moves them back, then sums;
 * and ends at end of input. Its output depends only on MIB and the steps. After each step it
 * prints to stderr what backs its memory ("backing NAME", the name in /proc/self/maps of the
 * area holding page 256, "anon" if none), and what backs a second, small area of 128 KiB
 * inside one 1 MiB-aligned window ("small NAME"), which `restore --map` leaves anonymous
 * (an area within one window could otherwise be grown by mremap from the image file). The
 * steps' results are checked as they go; a wrong one prints "BAD ..." and exits 1. An alarm ends
 * it if a step hangs. */
#define _GNU_SOURCE
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#define PG 4096

static unsigned char *mem, *small;
static size_t len;
#define SMALL (128 << 10)
#define WIN (1 << 20)

static unsigned char at(size_t i) { return (unsigned char)(i * 2654435761u >> 13); }

static uint64_t sum(void) {
  uint64_t s = 0;
  for (size_t i = 0; i < len; i++) s = s * 31 + mem[i];
  for (size_t i = 0; i < SMALL; i++) s = s * 31 + small[i];
  return s;
}

static int allzero(const unsigned char *p, size_t n) {
  for (size_t i = 0; i < n; i++)
    if (p[i]) return 0;
  return 1;
}

static int zeros(size_t from, size_t n) { return allzero(mem + from, n); }

static void backing_of(const char *what, const void *p) {
  char l[512];
  unsigned long a = (unsigned long)p, s, e;
  FILE *f = fopen("/proc/self/maps", "r");
  while (f && fgets(l, sizeof l, f)) {
    int n = 0;
    if (sscanf(l, "%lx-%lx %*s %*s %*s %*s %n", &s, &e, &n) < 2 || a < s || a >= e) continue;
    l[strcspn(l, "\n")] = 0;
    fprintf(stderr, "%s %s\n", what, n && l[n] ? l + n : "anon");
    break;
  }
  if (f) fclose(f);
}

static void backing(void) {
  backing_of("backing", mem + 256 * PG);
  backing_of("small", small);
}

int main(int argc, char **argv) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  alarm(120);
  len = (size_t)atol(argc > 1 ? argv[1] : "8") << 20;
  mem = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mem == MAP_FAILED || len < 256 * PG) return 2;
  for (size_t i = 0; i < len; i++) mem[i] = at(i);
  /* The small area: 1 MiB-aligned, and with its own flags (MADV_DONTFORK) so that it never
   * merges with a neighbour. */
  unsigned char *r = mmap(NULL, 2 * WIN, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (r == MAP_FAILED) return 2;
  small = (unsigned char *)(((unsigned long)r + WIN - 1) & ~(unsigned long)(WIN - 1));
  munmap(r, 2 * WIN);
  if (mmap(small, SMALL, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0) != small) return 2;
  if (madvise(small, SMALL, MADV_DONTFORK)) return 2;
  for (size_t i = 0; i < SMALL; i++) small[i] = at(i + 7);
  printf("READY\n");
  char line[64];
  while (fgets(line, sizeof line, stdin)) {
    if (!strncmp(line, "write", 5)) {
      for (size_t p = 0; p < len / PG; p += 7) mem[p * PG]++;
    } else if (!strncmp(line, "discard", 7)) {
      if (madvise(mem, 64 * PG, MADV_DONTNEED)) { printf("BAD dontneed failed\n"); return 1; }
      if (!zeros(0, 64 * PG)) { printf("BAD discarded pages are not zeros\n"); return 1; }
      if (madvise(mem + 64 * PG, 64 * PG, MADV_FREE)) { printf("BAD free failed\n"); return 1; }
      if (munmap(mem + 128 * PG, 64 * PG)) { printf("BAD munmap failed\n"); return 1; }
      void *p = mmap(mem + 128 * PG, 64 * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
      if (p != mem + 128 * PG || !zeros(128 * PG, 64 * PG)) { printf("BAD fresh memory\n"); return 1; }
      /* MADV_FREE leaves either the bytes or zeros: make it one answer. */
      memset(mem + 64 * PG, 0, 64 * PG);
      /* 16 pages inside one 1 MiB window (one mapping after `restore --map`), moved. */
      unsigned char *from = (unsigned char *)((((unsigned long)mem + WIN - 1) & ~(unsigned long)(WIN - 1)) + WIN + 64 * PG);
      unsigned char *to = mmap(NULL, 16 * PG, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (to == MAP_FAILED || mremap(from, 16 * PG, 16 * PG, MREMAP_MAYMOVE | MREMAP_FIXED, to) != to) { printf("BAD mremap away\n"); return 1; }
      if (madvise(to, 16 * PG, MADV_DONTNEED) || !allzero(to, 16 * PG)) { printf("BAD moved pages discarded are not zeros\n"); return 1; }
      if (mremap(to, 16 * PG, 16 * PG, MREMAP_MAYMOVE | MREMAP_FIXED, from) != from) { printf("BAD mremap back\n"); return 1; }
    } else if (strncmp(line, "check", 5)) {
      printf("BAD step %s", line);
      return 1;
    }
    line[strcspn(line, "\n")] = 0;
    printf("%s %016llx\n", line, (unsigned long long)sum());
    backing();
  }
  printf("done\n");
  return 0;
}
