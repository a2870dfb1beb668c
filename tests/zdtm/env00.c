/* Environment and command line: setenv in the heap, /proc/self/environ and cmdline as at start. */
#include "zdtm.h"

static char environ0[8192], cmdline0[8192];
static int envlen, cmdlen;

static void check(void)
{
	char buf[8192];
	int n;
	if (!getenv("ZDTM_ENV00") || strcmp(getenv("ZDTM_ENV00"), "value with spaces = and more"))
		fail("getenv ZDTM_ENV00 = %s", getenv("ZDTM_ENV00") ? getenv("ZDTM_ENV00") : "(null)");
	n = zd_readfile("/proc/self/environ", buf, sizeof buf);
	if (n != envlen || memcmp(buf, environ0, (size_t)n))
		fail("/proc/self/environ differs (%d bytes, was %d)", n, envlen);
	n = zd_readfile("/proc/self/cmdline", buf, sizeof buf);
	if (n != cmdlen || memcmp(buf, cmdline0, (size_t)n))
		fail("/proc/self/cmdline differs (%d bytes, was %d)", n, cmdlen);
}

int main(void)
{
	setenv("ZDTM_ENV00", "value with spaces = and more", 1);
	envlen = zd_readfile("/proc/self/environ", environ0, sizeof environ0);
	cmdlen = zd_readfile("/proc/self/cmdline", cmdline0, sizeof cmdline0);
	zd_main(NULL, check);
}
