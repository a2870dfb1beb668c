/* A mount namespace of its own with a tmpfs mounted in it, and a file open on that tmpfs. */
#include "zdtm.h"
#include <sched.h>
#include <sys/mount.h>

static int fd;

static void check(void)
{
	char buf[16] = {0};
	struct stat st;
	if (pread(fd, buf, 8, 0) != 8 || strcmp(buf, "on-tmpfs"))
		fail("file on the private tmpfs: %s", buf);
	if (stat("mntns00.dir/f", &st))
		fail("the private mount is gone (its mount namespace lost?): errno %d", errno);
}

int main(void)
{
	mkdir("mntns00.dir", 0700);
	if (unshare(CLONE_NEWNS) || mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) ||
	    mount("zdtm", "mntns00.dir", "tmpfs", 0, "size=64k"))
		die("mntns");
	fd = open("mntns00.dir/f", O_CREAT | O_RDWR, 0600);
	write(fd, "on-tmpfs", 8);
	zd_main(NULL, check);
}
