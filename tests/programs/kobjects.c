/* Kernel objects keep their state across a checkpoint: a pipe between threads with
 * unread bytes, eventfds (counter, semaphore mode), a timerfd (time left, interval), a
 * signalfd (mask), and an epoll (interest list with its data). Prints READY, waits for a
 * line on stdin, then checks each one. */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/signalfd.h>
#include <sys/timerfd.h>
#include <unistd.h>

static int pfd[2];
static char got[64];

static void *reader(void *x) {
  (void)x;
  /* Reads only after the restore: the bytes written before the checkpoint must be there. */
  usleep(300000);
  ssize_t n = read(pfd[0], got, sizeof got - 1);
  if (n > 0) got[n] = 0;
  return NULL;
}

int main(void) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  pipe(pfd);
  write(pfd[1], "unread bytes", 12);
  int ev = eventfd(5, 0), sem = eventfd(3, EFD_SEMAPHORE | EFD_NONBLOCK);
  int tf = timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC);
  struct itimerspec its = {.it_interval = {0, 300000000}, .it_value = {1, 500000000}};
  timerfd_settime(tf, 0, &its, NULL);
  sigset_t m;
  sigemptyset(&m);
  sigaddset(&m, SIGUSR1);
  sigprocmask(SIG_BLOCK, &m, NULL);
  int sf = signalfd(-1, &m, SFD_NONBLOCK);
  int ep = epoll_create1(0), idle = eventfd(0, 0);
  struct epoll_event e1 = {.events = EPOLLIN, .data.u64 = 0x1234}, e2 = {.events = EPOLLIN | EPOLLET, .data.u64 = 0x5678},
                     e3 = {.events = EPOLLIN, .data.u64 = 0x9abc};
  epoll_ctl(ep, EPOLL_CTL_ADD, ev, &e1);
  epoll_ctl(ep, EPOLL_CTL_ADD, sf, &e2);
  epoll_ctl(ep, EPOLL_CTL_ADD, idle, &e3);
  pthread_t t;
  printf("READY\n");
  char line[16];
  if (!fgets(line, sizeof line, stdin)) return 2;
  pthread_create(&t, NULL, reader, NULL);
  pthread_join(t, NULL);
  printf("pipe: %s\n", got);
  uint64_t v = 0;
  read(ev, &v, 8);
  printf("eventfd counter: %lu\n", (unsigned long)v);
  int sems = 0;
  while (read(sem, &v, 8) == 8) sems++;
  printf("semaphore eventfd: %d reads of 1\n", sems);
  struct itimerspec cur;
  timerfd_gettime(tf, &cur);
  printf("timerfd: armed %d, interval %ld ms\n", cur.it_value.tv_sec > 0 || cur.it_value.tv_nsec > 0, cur.it_interval.tv_nsec / 1000000);
  read(tf, &v, 8);
  printf("timerfd fired: %d\n", v >= 1);
  raise(SIGUSR1);
  struct epoll_event out[4];
  int n = epoll_wait(ep, out, 4, 1000);
  unsigned long seen = 0;
  for (int i = 0; i < n; i++) seen |= out[i].data.u64 == 0x5678 ? 2 : out[i].data.u64 == 0x1234 ? 1 : 4;
  printf("epoll: %d ready, data ok %d\n", n, seen == 2);
  struct signalfd_siginfo si;
  printf("signalfd: got signal %d\n", read(sf, &si, sizeof si) == sizeof si ? (int)si.ssi_signo : -1);
  return 0;
}
