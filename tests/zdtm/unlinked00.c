/* Deleted files: one open (with its offset and flags), one mapped privately and changed, one mapped shared. */
#include "zdtm.h"

static int fd;
static char *priv, *shared;

static void check(void)
{
	struct stat st;
	char buf[16] = {0};
	if (fstat(fd, &st) || st.st_nlink != 0 || st.st_size != 9000)
		fail("deleted file: nlink %lu size %ld", (unsigned long)st.st_nlink, (long)st.st_size);
	if (lseek(fd, 0, SEEK_CUR) != 1234)
		fail("offset %ld", (long)lseek(fd, 0, SEEK_CUR));
	if (!(fcntl(fd, F_GETFL) & O_APPEND))
		fail("O_APPEND lost");
	pread(fd, buf, 7, 8000);
	if (memcmp(buf, "deleted", 7))
		fail("bytes: %s", buf);
	if (memcmp(priv, "private-changed", 15) || memcmp(priv + 4096, "map-file", 8))
		fail("private mapping of a deleted file: %.15s / %.8s", priv, priv + 4096);
	if (memcmp(shared + 8000, "deleted", 7))
		fail("shared mapping of the deleted file");
	shared[10] = 'S';
	pread(fd, buf, 1, 10);
	if (buf[0] != 'S')
		fail("the shared mapping and the fd no longer share");
}

int main(void)
{
	fd = open("unlinked00.file", O_RDWR | O_CREAT | O_TRUNC, 0600);
	int g = open("unlinked00.map", O_RDWR | O_CREAT | O_TRUNC, 0600);
	ftruncate(fd, 9000);
	pwrite(fd, "deleted", 7, 8000);
	ftruncate(g, 8192);
	pwrite(g, "map-file", 8, 4096);
	priv = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_PRIVATE, g, 0);
	shared = mmap(NULL, 12288, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (priv == MAP_FAILED || shared == MAP_FAILED)
		die("mmap");
	memcpy(priv, "private-changed", 15);
	close(g);
	lseek(fd, 1234, SEEK_SET);
	fcntl(fd, F_SETFL, O_APPEND);
	unlink("unlinked00.file");
	unlink("unlinked00.map");
	zd_main(NULL, check);
}
