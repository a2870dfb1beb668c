/* Open file descriptions: dup'ed fds share one offset, reopened ones do not; fd flags (CLOEXEC),
 * status flags (O_APPEND, O_NONBLOCK, O_NOATIME), a directory fd with its getdents position. */
#include "zdtm.h"
#include <dirent.h>

static int a, b, c, d, dirfd_;
static long dirpos;

static void check(void)
{
	lseek(a, 777, SEEK_SET);
	if (lseek(b, 0, SEEK_CUR) != 777)
		fail("dup'ed fds no longer share their offset (%ld)", (long)lseek(b, 0, SEEK_CUR));
	if (lseek(c, 0, SEEK_CUR) != 100)
		fail("separately opened fd: offset %ld, want 100", (long)lseek(c, 0, SEEK_CUR));
	if (!(fcntl(b, F_GETFD) & FD_CLOEXEC) || (fcntl(a, F_GETFD) & FD_CLOEXEC))
		fail("FD_CLOEXEC: a %d b %d", fcntl(a, F_GETFD), fcntl(b, F_GETFD));
	int fl = fcntl(d, F_GETFL);
	if (!(fl & O_APPEND) || !(fl & O_NONBLOCK) || (fl & O_ACCMODE) != O_WRONLY)
		fail("status flags %x", fl);
	if (lseek(dirfd_, 0, SEEK_CUR) != dirpos)
		fail("directory position %ld, was %ld", (long)lseek(dirfd_, 0, SEEK_CUR), dirpos);
}

int main(void)
{
	int f = open("fdshare00.file", O_RDWR | O_CREAT | O_TRUNC, 0600);
	ftruncate(f, 10000);
	close(f);
	a = open("fdshare00.file", O_RDWR);
	b = fcntl(a, F_DUPFD_CLOEXEC, 50);
	c = open("fdshare00.file", O_RDONLY);
	d = open("fdshare00.file", O_WRONLY | O_APPEND | O_NONBLOCK);
	lseek(a, 300, SEEK_SET);
	lseek(c, 100, SEEK_SET);
	mkdir("fdshare00.dir", 0700);
	for (int i = 0; i < 40; i++) {
		char n[64];
		snprintf(n, sizeof n, "fdshare00.dir/entry-%02d", i);
		close(open(n, O_CREAT | O_RDWR, 0600));
	}
	dirfd_ = open("fdshare00.dir", O_RDONLY | O_DIRECTORY);
	char buf[512];
	syscall(SYS_getdents64, dirfd_, buf, sizeof buf); /* part of the entries read */
	dirpos = lseek(dirfd_, 0, SEEK_CUR);
	zd_main(NULL, check);
}
