/* A file mapping longer than its file: the pages past the end still raise SIGBUS, and a private
 * file mapping at an offset keeps its offset. */
#include "zdtm.h"
#include <setjmp.h>
#include <signal.h>

static char *m, *off;
static sigjmp_buf jb;

static void on_bus(int s) { (void)s; siglongjmp(jb, 1); }

static void check(void)
{
	volatile int bus = 0;
	if (m[0] != 'A' || m[4095] != 'B')
		fail("first page");
	if (sigsetjmp(jb, 1) == 0) {
		volatile char c = m[2 * 4096];
		(void)c;
	} else {
		bus = 1;
	}
	if (!bus)
		fail("no SIGBUS past the end of the file (the mapping is not the file's any more)");
	if (off[0] != 'C')
		fail("mapping at offset 8192: %c", off[0]);
}

int main(void)
{
	int fd = open("sigbus00.file", O_RDWR | O_CREAT | O_TRUNC, 0600);
	ftruncate(fd, 4096);
	pwrite(fd, "A", 1, 0);
	pwrite(fd, "B", 1, 4095);
	m = mmap(NULL, 4 * 4096, PROT_READ, MAP_PRIVATE, fd, 0);
	int g = open("sigbus00.big", O_RDWR | O_CREAT | O_TRUNC, 0600);
	ftruncate(g, 4 * 4096);
	pwrite(g, "C", 1, 8192);
	off = mmap(NULL, 4096, PROT_READ, MAP_PRIVATE, g, 8192);
	close(g);
	close(fd);
	signal(SIGBUS, on_bus);
	if (m == MAP_FAILED || off == MAP_FAILED)
		die("mmap");
	zd_main(NULL, check);
}
