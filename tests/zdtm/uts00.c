/* A UTS namespace of its own with its hostname and domain name. */
#include "zdtm.h"
#include <sched.h>

static void check(void)
{
	char h[64] = {0}, d[64] = {0};
	gethostname(h, sizeof h);
	getdomainname(d, sizeof d);
	if (strcmp(h, "zdtm-uts-host") || strcmp(d, "zdtm-domain"))
		fail("hostname %s domain %s (its own UTS namespace lost?)", h, d);
}

int main(void)
{
	if (unshare(CLONE_NEWUTS) || sethostname("zdtm-uts-host", 13) || setdomainname("zdtm-domain", 11))
		die("uts");
	zd_main(NULL, check);
}
