/* personality flags (ADDR_NO_RANDOMIZE, ADDR_COMPAT_LAYOUT, UNAME26... as set). */
#include "zdtm.h"
#include <sys/personality.h>

static int p0;

static void check(void)
{
	int p = personality(0xffffffff);
	if (p != p0)
		fail("personality %x, was %x", p, p0);
}

int main(void)
{
	personality(ADDR_NO_RANDOMIZE | ADDR_COMPAT_LAYOUT | UNAME26 | SHORT_INODE);
	p0 = personality(0xffffffff);
	zd_main(NULL, check);
}
