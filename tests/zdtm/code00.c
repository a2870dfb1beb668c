/* Code written at run time into an anonymous executable mapping (a JIT), and a deep stack. */
#include "zdtm.h"

static unsigned char *code;

static long depth(long n) { volatile char pad[256]; pad[0] = (char)n; return n ? depth(n - 1) + pad[0] * 0 + 1 : 0; }

static void check(void)
{
	long (*f)(void) = (long (*)(void))code;
	if (f() != 0x1234567)
		fail("jitted code returned %lx", f());
	if (depth(20000) != 20000)
		fail("deep recursion");
}

int main(void)
{
	/* mov eax, 0x1234567; ret */
	static const unsigned char prog[] = {0xb8, 0x67, 0x45, 0x23, 0x01, 0xc3};
	code = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	memcpy(code, prog, sizeof prog);
	if (mprotect(code, 4096, PROT_READ | PROT_EXEC))
		die("mprotect");
	zd_main(NULL, check);
}
