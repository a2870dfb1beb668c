/* The restore helper: ckpt/restore/helper.py embeds these bytes (keep both in step;
 * tests/test_restore.py reassembles this file and compares).
 *
 * No libc, no stack use, position-independent except the set_tid pointer, which helper.py
 * fills in. It clone3()s a child with CLONE_PARENT, so that the child becomes a child of
 * `ckpt restore` itself (which can then wait for it like any child), with the pid asked for
 * in set_tid when set_tid_size is 1. The parent writes clone3's result (the child's pid or
 * -errno) to the fd in `resfd` and exits; the child waits in pause() to be seized.
 * The child dies with `ckpt restore` (PR_SET_PDEATHSIG SIGKILL) until it is seized (then
 * PTRACE_O_EXITKILL takes over): a ckpt killed between clone3 and the seize left a stray helper
 * paused forever. If ckpt is already gone by then (its parent changed), it exits at once.
 */
    .text
    .globl _start
_start:
    mov $110, %eax               /* getppid: ckpt, the parent the child will share */
    syscall
    mov %rax, %r12
    lea args(%rip), %rdi
    mov $80, %esi                /* CLONE_ARGS_SIZE_VER1: up to set_tid_size */
    mov $435, %eax               /* clone3 */
    syscall
    test %rax, %rax
    jz child
    mov %rax, result(%rip)
    mov resfd(%rip), %edi
    lea result(%rip), %rsi
    mov $8, %edx
    mov $1, %eax                 /* write */
    syscall
    xor %edi, %edi
    mov $60, %eax                /* exit */
    syscall
child:
    mov $157, %eax               /* prctl */
    mov $1, %edi                 /* PR_SET_PDEATHSIG */
    mov $9, %esi                 /* SIGKILL */
    syscall
    mov $110, %eax               /* getppid */
    syscall
    cmp %rax, %r12
    jne gone
wait:
    mov $34, %eax                /* pause */
    syscall
    jmp wait
gone:
    mov $1, %edi
    mov $231, %eax               /* exit_group */
    syscall
    .balign 8
args:                            /* struct clone_args */
    .quad 0x8000, 0, 0, 0, 0, 0, 0, 0    /* flags=CLONE_PARENT, exit_signal 0 (inherited) */
    .quad 0, 0                   /* set_tid (pointer to tid), set_tid_size: patched */
tid: .long 0
resfd: .long 3
result: .quad 0
