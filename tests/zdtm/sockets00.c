/* Listening TCP (IPv4 loopback, SO_REUSEADDR, backlog) and a bound UDP socket; a client connects
 * after the restore. */
#include "zdtm.h"
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

static int ls, us;
static struct sockaddr_in la, ua;

static void check(void)
{
	int c = socket(AF_INET, SOCK_STREAM, 0), one = 0;
	socklen_t l = sizeof one;
	if (connect(c, (struct sockaddr *)&la, sizeof la))
		fail("connect to the listener: errno %d", errno);
	int s = accept(ls, NULL, NULL);
	if (s < 0 || write(c, "hi", 2) != 2 || read(s, &one, 2) != 2)
		fail("accept/echo: errno %d", errno);
	getsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, &l);
	if (!one)
		fail("SO_REUSEADDR lost");
	struct sockaddr_in got;
	l = sizeof got;
	getsockname(us, (struct sockaddr *)&got, &l);
	if (got.sin_port != ua.sin_port)
		fail("udp port %d, was %d", ntohs(got.sin_port), ntohs(ua.sin_port));
	int u = socket(AF_INET, SOCK_DGRAM, 0);
	char buf[8] = {0};
	sendto(u, "dg", 2, 0, (struct sockaddr *)&ua, sizeof ua);
	if (recv(us, buf, sizeof buf, 0) != 2)
		fail("udp datagram not received");
	close(u);
	close(c);
	close(s);
}

int main(void)
{
	int one = 1;
	socklen_t l = sizeof la;
	ls = socket(AF_INET, SOCK_STREAM, 0);
	us = socket(AF_INET, SOCK_DGRAM, 0);
	setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
	la.sin_family = ua.sin_family = AF_INET;
	la.sin_addr.s_addr = ua.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (bind(ls, (struct sockaddr *)&la, sizeof la) || listen(ls, 7) || bind(us, (struct sockaddr *)&ua, sizeof ua))
		die("bind");
	getsockname(ls, (struct sockaddr *)&la, &l);
	l = sizeof ua;
	getsockname(us, (struct sockaddr *)&ua, &l);
	zd_main(NULL, check);
}
