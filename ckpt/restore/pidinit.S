/* pid 1 of the namespace a --pidns restore makes: ckpt/restore/pidns.py embeds these bytes (keep
 * both in step; tests/test_pidns.py reassembles this file and compares).
 *
 * Written into the init's own stub page (helper.py) and entered by setting its registers; no libc,
 * no stack. It blocks every signal and takes them one by one with rt_sigtimedwait: a blocked signal
 * is queued even for a namespace's init, which would drop one with the default action. SIGCHLD
 * reaps every child that ended (orphans of the tree included); when the reaped one is the restored
 * root (`root`, its pid inside the namespace), the init exits with the root's status (its exit code,
 * or 128 + the signal that ended it: an init cannot be ended by a signal of its own). The kernel
 * then kills what is left of the namespace. Any other signal is passed on to the root.
 */
    .text
    .globl _start
_start:
    mov $14, %eax                /* rt_sigprocmask */
    xor %edi, %edi               /* SIG_BLOCK */
    lea all(%rip), %rsi
    xor %edx, %edx
    mov $8, %r10d
    syscall
next:
    mov $128, %eax               /* rt_sigtimedwait(all, NULL, NULL, 8) */
    lea all(%rip), %rdi
    xor %esi, %esi
    xor %edx, %edx
    mov $8, %r10d
    syscall
    cmp $17, %eax                /* SIGCHLD */
    je reap
    test %eax, %eax
    jle next                     /* -EINTR (a ptrace stop): wait again */
    mov %eax, %esi
    mov root(%rip), %edi
    mov $62, %eax                /* kill(root, sig) */
    syscall
    jmp next
reap:
    mov $61, %eax                /* wait4(-1, &status, WNOHANG|__WALL, NULL) */
    mov $-1, %edi
    lea status(%rip), %rsi
    mov $0x40000001, %edx
    xor %r10d, %r10d
    syscall
    cmp $-10, %rax               /* -ECHILD: nothing left, the root included */
    je done
    test %rax, %rax
    jle next
    cmp root(%rip), %eax
    jne reap
done:
    mov status(%rip), %edi
    mov %edi, %eax
    and $0x7f, %eax
    jz exited
    lea 128(%rax), %edi
    jmp out
exited:
    shr $8, %edi
    and $0xff, %edi
out:
    mov $231, %eax               /* exit_group */
    syscall
    .balign 8
all: .quad -1
root: .long 0
status: .long 0
