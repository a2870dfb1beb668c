/* Working directory, umask, and a deleted working directory in a second test program (cwd01). */
#include "zdtm.h"

static char cwd0[4096];

static void check(void)
{
	char cwd[4096];
	mode_t m = umask(0);
	umask(m);
	if (m != 0137)
		fail("umask %o, was 0137", m);
	if (!getcwd(cwd, sizeof cwd) || strcmp(cwd, cwd0))
		fail("cwd %s, was %s", cwd, cwd0);
}

int main(void)
{
	mkdir("cwd00.dir", 0700);
	if (chdir("cwd00.dir"))
		die("chdir");
	getcwd(cwd0, sizeof cwd0);
	umask(0137);
	zd_main(NULL, check);
}
