/* A process that chroot()ed into a directory. */
#include "zdtm.h"

static void check(void)
{
	struct stat st;
	if (stat("/marker-in-root", &st))
		fail("/marker-in-root not found: its root directory is not the chroot any more");
	if (stat("/proc", &st) == 0)
		fail("/proc seen: the root is not the chroot");
}

int main(void)
{
	mkdir("root", 0755);
	close(open("root/marker-in-root", O_CREAT | O_RDWR, 0600));
	if (chroot("root") || chdir("/"))
		die("chroot");
	zd_main(NULL, check);
}
