/* A FIFO by path, opened read-write and read-only and write-only, with bytes in it. */
#include "zdtm.h"

static int rw, rd, wr;

static void check(void)
{
	char buf[64] = {0};
	struct stat st;
	if (fstat(rw, &st) || !S_ISFIFO(st.st_mode))
		fail("fd is no FIFO");
	if (read(rd, buf, 11) != 11 || memcmp(buf, "fifo-bytes!", 11))
		fail("fifo bytes: %s", buf);
	if (write(wr, "x", 1) != 1 || read(rw, buf, 1) != 1 || buf[0] != 'x')
		fail("fifo round trip");
	if ((fcntl(rd, F_GETFL) & O_ACCMODE) != O_RDONLY || (fcntl(wr, F_GETFL) & O_ACCMODE) != O_WRONLY)
		fail("access modes");
}

int main(void)
{
	if (mkfifo("fifo00.fifo", 0600))
		die("mkfifo");
	rw = open("fifo00.fifo", O_RDWR);
	rd = open("fifo00.fifo", O_RDONLY | O_NONBLOCK);
	wr = open("fifo00.fifo", O_WRONLY);
	if (rw < 0 || rd < 0 || wr < 0 || write(wr, "fifo-bytes!", 11) != 11)
		die("fifo");
	fcntl(rd, F_SETFL, 0);
	zd_main(NULL, check);
}
