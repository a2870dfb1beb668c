/* Names that end in " (deleted)" but are not: a working directory and an open file so named. */
#include "zdtm.h"

static int fd;

static void check(void)
{
	char cwd[512];
	struct stat st;
	if (!getcwd(cwd, sizeof cwd) || !strstr(cwd, "/dir (deleted)"))
		fail("cwd %s", cwd);
	if (stat(".", &st) || st.st_nlink == 0)
		fail("cwd is a removed directory now");
	if (fstat(fd, &st) || st.st_nlink != 1)
		fail("file nlink %lu (a copy of it?)", (unsigned long)st.st_nlink);
	pwrite(fd, "Z", 1, 0);
	char c = 0;
	int g = open("file (deleted)", O_RDONLY);
	pread(g, &c, 1, 0);
	close(g);
	if (c != 'Z')
		fail("fd and the file by its name differ");
}

int main(void)
{
	mkdir("dir (deleted)", 0700);
	if (chdir("dir (deleted)"))
		die("chdir");
	fd = open("file (deleted)", O_RDWR | O_CREAT, 0600);
	write(fd, "abc", 3);
	zd_main(NULL, check);
}
