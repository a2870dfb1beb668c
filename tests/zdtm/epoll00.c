/* epoll: a set of fds (pipe, eventfd) with event masks and data; only ready ones reported. */
#include "zdtm.h"
#include <sys/epoll.h>
#include <sys/eventfd.h>

static int ep, p[2], q[2], e;

static void check(void)
{
	struct epoll_event ev[8];
	int n = epoll_wait(ep, ev, 8, 0), got = 0;
	for (int i = 0; i < n; i++)
		got |= (int)ev[i].data.u64 == 0x1111 && ev[i].events == EPOLLIN ? 1 :
		       ev[i].data.u64 == 0x2222222222ULL && ev[i].events == EPOLLIN ? 2 :
		       ev[i].data.u64 == 0x3333 && ev[i].events == EPOLLOUT ? 4 : 8;
	if (n != 3 || got != 7)
		fail("epoll_wait: %d events, mask %d (want 3 events: pipe in, eventfd in, pipe out)", n, got);
}

int main(void)
{
	ep = epoll_create1(EPOLL_CLOEXEC);
	pipe(p);
	pipe(q);
	e = eventfd(1, 0);
	write(p[1], "x", 1);
	struct epoll_event a = {.events = EPOLLIN, .data.u64 = 0x1111};
	struct epoll_event b = {.events = EPOLLIN | EPOLLET, .data.u64 = 0x2222222222ULL};
	struct epoll_event c = {.events = EPOLLOUT, .data.u64 = 0x3333};
	struct epoll_event d = {.events = EPOLLIN, .data.u64 = 0x4444}; /* q[0]: nothing to read */
	if (epoll_ctl(ep, EPOLL_CTL_ADD, p[0], &a) || epoll_ctl(ep, EPOLL_CTL_ADD, e, &b) ||
	    epoll_ctl(ep, EPOLL_CTL_ADD, q[1], &c) || epoll_ctl(ep, EPOLL_CTL_ADD, q[0], &d))
		die("epoll_ctl");
	zd_main(NULL, check);
}
