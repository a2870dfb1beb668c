/* memfd: its bytes, its seals, its name, and a shared mapping of it that still shares with the fd. */
#include "zdtm.h"

static int fd;
static char *m;

static void check(void)
{
	char buf[32] = {0}, link[128] = {0}, path[64];
	if (fcntl(fd, F_GET_SEALS) != (F_SEAL_SHRINK | F_SEAL_GROW))
		fail("seals %x, want %x", fcntl(fd, F_GET_SEALS), F_SEAL_SHRINK | F_SEAL_GROW);
	pread(fd, buf, 10, 5000);
	if (memcmp(buf, "memfd-data", 10))
		fail("memfd bytes: %s", buf);
	m[8000] = 'Q';
	pread(fd, buf, 1, 8000);
	if (buf[0] != 'Q')
		fail("the mapping no longer shares the memfd's pages");
	snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
	readlink(path, link, sizeof link - 1);
	if (strcmp(link, "/memfd:zdtm-memfd (deleted)"))
		fail("memfd name: %s", link);
	if (ftruncate(fd, 4096) == 0)
		fail("shrink allowed despite F_SEAL_SHRINK");
}

int main(void)
{
	fd = memfd_create("zdtm-memfd", MFD_ALLOW_SEALING);
	if (fd < 0 || ftruncate(fd, 3 * 4096))
		die("memfd");
	pwrite(fd, "memfd-data", 10, 5000);
	m = mmap(NULL, 3 * 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (m == MAP_FAILED || fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW))
		die("seal");
	zd_main(NULL, check);
}
