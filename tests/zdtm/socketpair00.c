/* Unix socketpairs: stream with bytes queued both ways, datagram with message boundaries, seqpacket. */
#include "zdtm.h"
#include <sys/socket.h>

static int st[2], dg[2], sp[2];

static void check(void)
{
	char buf[64] = {0};
	if (recv(st[0], buf, sizeof buf, MSG_DONTWAIT) != 10 || memcmp(buf, "stream-a2b", 10))
		fail("stream a<-b: %s", buf);
	if (recv(st[1], buf, sizeof buf, MSG_DONTWAIT) != 10 || memcmp(buf, "stream-b2a", 10))
		fail("stream b<-a: %s", buf);
	if (recv(dg[1], buf, sizeof buf, MSG_DONTWAIT) != 3 || memcmp(buf, "one", 3))
		fail("dgram 1: %s", buf);
	if (recv(dg[1], buf, sizeof buf, MSG_DONTWAIT) != 5 || memcmp(buf, "two22", 5))
		fail("dgram 2: %s", buf);
	if (recv(sp[0], buf, sizeof buf, MSG_DONTWAIT) != 6 || memcmp(buf, "packet", 6))
		fail("seqpacket: %s", buf);
	int type;
	socklen_t l = sizeof type;
	getsockopt(sp[0], SOL_SOCKET, SO_TYPE, &type, &l);
	if (type != SOCK_SEQPACKET)
		fail("type %d", type);
	if (send(st[0], "x", 1, 0) != 1 || recv(st[1], buf, 1, 0) != 1)
		fail("still connected");
}

int main(void)
{
	if (socketpair(AF_UNIX, SOCK_STREAM, 0, st) || socketpair(AF_UNIX, SOCK_DGRAM, 0, dg) ||
	    socketpair(AF_UNIX, SOCK_SEQPACKET, 0, sp))
		die("socketpair");
	send(st[1], "stream-a2b", 10, 0);
	send(st[0], "stream-b2a", 10, 0);
	send(dg[0], "one", 3, 0);
	send(dg[0], "two22", 5, 0);
	send(sp[1], "packet", 6, 0);
	zd_main(NULL, check);
}
