/* O_PATH fds: of a file, of a directory (usable with openat), of a symlink itself (O_NOFOLLOW). */
#include "zdtm.h"

static int pf, pd, pl;

static void check(void)
{
	char link[256] = {0}, path[64];
	if (!(fcntl(pf, F_GETFL) & O_PATH) || !(fcntl(pd, F_GETFL) & O_PATH))
		fail("O_PATH lost: %x %x", fcntl(pf, F_GETFL), fcntl(pd, F_GETFL));
	int f = openat(pd, "inner", O_RDONLY);
	if (f < 0)
		fail("openat on the O_PATH dir fd: errno %d", errno);
	close(f);
	struct stat st;
	if (fstatat(pl, "", &st, AT_EMPTY_PATH) || !S_ISLNK(st.st_mode))
		fail("the O_PATH|O_NOFOLLOW fd is no longer the symlink itself");
	if (readlinkat(pl, "", link, sizeof link - 1) < 0 || strcmp(link, "target-of-link"))
		fail("readlinkat: %s", link);
	snprintf(path, sizeof path, "/proc/self/fd/%d", pf);
	readlink(path, link, sizeof link - 1);
	if (!strstr(link, "opath00.file"))
		fail("file: %s", link);
}

int main(void)
{
	close(open("opath00.file", O_CREAT | O_RDWR, 0600));
	mkdir("opath00.dir", 0700);
	close(open("opath00.dir/inner", O_CREAT | O_RDWR, 0600));
	symlink("target-of-link", "opath00.link");
	pf = open("opath00.file", O_PATH);
	pd = open("opath00.dir", O_PATH | O_DIRECTORY);
	pl = open("opath00.link", O_PATH | O_NOFOLLOW);
	if (pf < 0 || pd < 0 || pl < 0)
		die("O_PATH");
	zd_main(NULL, check);
}
