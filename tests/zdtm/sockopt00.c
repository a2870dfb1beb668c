/* Socket options: buffer sizes, keepalive, a receive timeout on a socketpair and a TCP listener. */
#include "zdtm.h"
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

static int sp[2], ls;

static int get(int fd, int level, int opt)
{
	int v = -1;
	socklen_t l = sizeof v;
	getsockopt(fd, level, opt, &v, &l);
	return v;
}

static int rcv0, snd0, lrcv0;

static void check(void)
{
	struct timeval tv;
	socklen_t l = sizeof tv;
	if (get(sp[0], SOL_SOCKET, SO_RCVBUF) != rcv0 || get(sp[0], SOL_SOCKET, SO_SNDBUF) != snd0)
		fail("socketpair buffers %d/%d, were %d/%d", get(sp[0], SOL_SOCKET, SO_RCVBUF),
		     get(sp[0], SOL_SOCKET, SO_SNDBUF), rcv0, snd0);
	if (get(sp[0], SOL_SOCKET, SO_PASSCRED) != 1)
		fail("SO_PASSCRED lost");
	getsockopt(sp[1], SOL_SOCKET, SO_RCVTIMEO, &tv, &l);
	if (tv.tv_sec != 77)
		fail("SO_RCVTIMEO %ld", tv.tv_sec);
	if (get(ls, SOL_SOCKET, SO_RCVBUF) != lrcv0 || get(ls, SOL_SOCKET, SO_KEEPALIVE) != 1)
		fail("listener: rcvbuf %d (was %d) keepalive %d", get(ls, SOL_SOCKET, SO_RCVBUF), lrcv0,
		     get(ls, SOL_SOCKET, SO_KEEPALIVE));
	if (get(ls, IPPROTO_TCP, TCP_NODELAY) != 1)
		fail("listener: TCP_NODELAY lost");
}

int main(void)
{
	int v;
	struct timeval tv = {77, 0};
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	socketpair(AF_UNIX, SOCK_STREAM, 0, sp);
	v = 50000;
	setsockopt(sp[0], SOL_SOCKET, SO_RCVBUF, &v, sizeof v);
	v = 70000;
	setsockopt(sp[0], SOL_SOCKET, SO_SNDBUF, &v, sizeof v);
	v = 1;
	setsockopt(sp[0], SOL_SOCKET, SO_PASSCRED, &v, sizeof v);
	setsockopt(sp[1], SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
	ls = socket(AF_INET, SOCK_STREAM, 0);
	v = 90000;
	setsockopt(ls, SOL_SOCKET, SO_RCVBUF, &v, sizeof v);
	v = 1;
	setsockopt(ls, SOL_SOCKET, SO_KEEPALIVE, &v, sizeof v);
	setsockopt(ls, IPPROTO_TCP, TCP_NODELAY, &v, sizeof v);
	if (bind(ls, (struct sockaddr *)&a, sizeof a) || listen(ls, 3))
		die("listen");
	rcv0 = get(sp[0], SOL_SOCKET, SO_RCVBUF);
	snd0 = get(sp[0], SOL_SOCKET, SO_SNDBUF);
	lrcv0 = get(ls, SOL_SOCKET, SO_RCVBUF);
	zd_main(NULL, check);
}
