/* A pipe with both ends in the process and bytes buffered in it; its size and O_NONBLOCK. */
#include "zdtm.h"

static int p[2];
static char data[70000];

static void touch(void)
{
	if (write(p[1], "more", 4) != 4)
		die("write");
}

static void check(void)
{
	char buf[sizeof data];
	ssize_t n = 0, r;
	if (fcntl(p[0], F_GETPIPE_SZ) != 1 << 20)
		fail("pipe size %d", fcntl(p[0], F_GETPIPE_SZ));
	if (!(fcntl(p[0], F_GETFL) & O_NONBLOCK))
		fail("read end lost O_NONBLOCK");
	while (n < (ssize_t)sizeof data && (r = read(p[0], buf + n, sizeof data - (size_t)n)) > 0)
		n += r;
	if (n != sizeof data || memcmp(buf, data, sizeof data))
		fail("pipe bytes differ (%zd read)", n);
	r = read(p[0], buf, sizeof buf);
	if (r != 4 && r != -1)
		fail("after the data: %zd bytes", r);
	if (r == -1 && errno != EAGAIN)
		fail("after the data errno %d", errno);
}

int main(void)
{
	if (pipe2(p, O_NONBLOCK) || fcntl(p[0], F_SETPIPE_SZ, 1 << 20) < 0)
		die("pipe");
	for (size_t i = 0; i < sizeof data; i++)
		data[i] = (char)(i * 31 + i / 257);
	if (write(p[1], data, sizeof data) != sizeof data)
		die("write");
	zd_main(touch, check);
}
