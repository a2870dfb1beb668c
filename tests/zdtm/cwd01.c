/* A working directory that was removed: the process still is in it (st_nlink 0), relative opens fail. */
#include "zdtm.h"

static void check(void)
{
	struct stat st;
	if (stat(".", &st))
		fail("stat . failed: %d", errno);
	else if (st.st_nlink != 0)
		fail("cwd nlink %lu, was 0 (deleted)", (unsigned long)st.st_nlink);
	if (open("x", O_CREAT | O_RDWR, 0600) >= 0 || errno != ENOENT)
		fail("create in the deleted cwd: errno %d, want ENOENT", errno);
}

int main(void)
{
	mkdir("cwd01.dir", 0700);
	if (chdir("cwd01.dir") || rmdir("../cwd01.dir"))
		die("chdir/rmdir");
	zd_main(NULL, check);
}
