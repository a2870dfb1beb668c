/* An fd whose name was removed while another hard link to the file remains: still that file. */
#include "zdtm.h"

static int fd;

static void check(void)
{
	char buf[8] = {0};
	pwrite(fd, "W", 1, 0);
	int g = open("link00.other", O_RDONLY);
	pread(g, buf, 1, 0);
	close(g);
	if (buf[0] != 'W')
		fail("the fd is no longer the file its other link names (a copy?): %c", buf[0]);
	struct stat a, b;
	fstat(fd, &a);
	stat("link00.other", &b);
	if (a.st_ino != b.st_ino)
		fail("inode %lu, the link's %lu", (unsigned long)a.st_ino, (unsigned long)b.st_ino);
}

int main(void)
{
	fd = open("link00.name", O_RDWR | O_CREAT, 0600);
	write(fd, "original", 8);
	if (link("link00.name", "link00.other") || unlink("link00.name"))
		die("link");
	zd_main(NULL, check);
}
