/* For the snapshot checkpoint: memory a copy-on-write child would not see as it is.
 * Fills one area marked MADV_DONTFORK (absent in a child) and one marked MADV_WIPEONFORK
 * (zeros in a child), prints READY, waits for a line, and prints checksums of both and
 * whether the flags are still set (VmFlags dc / wf in /proc/self/smaps). */
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>

#define LEN (256u << 10)

static int has_flag(void *a, const char *flag) {
  FILE *f = fopen("/proc/self/smaps", "r");
  char line[512], want[32];
  int in = 0, found = 0;
  snprintf(want, sizeof want, "%lx-", (unsigned long)a);
  while (f && fgets(line, sizeof line, f)) {
    if (!strncmp(line, want, strlen(want))) in = 1;
    else if (in && !strncmp(line, "VmFlags:", 8)) {
      char pat[8];
      snprintf(pat, sizeof pat, " %s", flag);
      found = strstr(line, pat) != NULL;
      break;
    }
  }
  if (f) fclose(f);
  return found;
}

static uint64_t sum(const uint8_t *p) {
  uint64_t h = 1469598103934665603ull;
  for (size_t i = 0; i < LEN; i++) h = (h ^ p[i]) * 1099511628211ull;
  return h;
}

int main(void) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  uint8_t *dc = mmap(NULL, LEN, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  uint8_t *wf = mmap(NULL, LEN, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (dc == MAP_FAILED || wf == MAP_FAILED || madvise(dc, LEN, MADV_DONTFORK) || madvise(wf, LEN, MADV_WIPEONFORK)) {
    perror("mmap/madvise");
    return 1;
  }
  for (size_t i = 0; i < LEN; i++) {
    dc[i] = (uint8_t)(i * 7 + 1);
    wf[i] = (uint8_t)(i * 13 + 5);
  }
  printf("READY\n");
  char line[64];
  if (!fgets(line, sizeof line, stdin)) return 2;
  printf("dontfork %016llx %d\n", (unsigned long long)sum(dc), has_flag(dc, "dc"));
  printf("wipeonfork %016llx %d\n", (unsigned long long)sum(wf), has_flag(wf, "wf"));
  return 0;
}
