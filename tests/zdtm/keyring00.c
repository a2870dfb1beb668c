/* A key in the process keyring (keyctl). */
#include "zdtm.h"

#define KEYCTL_SEARCH 10
#define KEY_SPEC_PROCESS_KEYRING -2

static void check(void)
{
	long k = syscall(SYS_keyctl, KEYCTL_SEARCH, KEY_SPEC_PROCESS_KEYRING, "user", "zdtm-key", 0);
	if (k < 0)
		fail("the key in the process keyring is gone: errno %d", errno);
}

int main(void)
{
	if (syscall(SYS_add_key, "user", "zdtm-key", "secret", 6, KEY_SPEC_PROCESS_KEYRING) < 0)
		die("add_key");
	zd_main(NULL, check);
}
