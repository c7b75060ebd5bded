//! x86-64 context switching for freeze and restart.
//!
//! A frozen thread sits in the agent's signal handler. The kernel put the interrupted code's
//! complete state (all registers, xsave area, signal mask, altstack) in the signal frame on
//! the thread's own stack, which is part of the image. The handler only needs to save the
//! callee-saved registers, stack pointer and return address of one call,
//! [`suspend_point`]: at restart a new kernel thread loads them with [`resume`] (or
//! [`clone_into`] creates the thread and does so), `suspend_point` "returns" 1, the handler
//! returns, and `rt_sigreturn` restores everything else.
//!
//! Rust has no `returns_twice`; that is fine here because the two returns of
//! `suspend_point` happen in different processes: the restored memory is the snapshot taken
//! while the call was in progress.
//!
//! # Safety
//! This module is assembly. The layout of [`Ctx`] is shared with the assembly and with
//! `SavedCtx` in the image format.

use core::arch::{asm, global_asm};

/// Callee-saved state at a suspend point (same order as `SavedCtx` in the image).
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct Ctx {
    pub rbx: u64,
    pub rbp: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rsp: u64,
    pub rip: u64,
    pub mxcsr: u32,
    pub fcw: u32,
}

/// Called with the context pointer while the thread is parked at a suspend point.
pub type ParkFn = unsafe extern "C" fn(*mut Ctx) -> u64;

global_asm!(
    ".text",
    ".globl limitless_suspend_point",
    ".hidden limitless_suspend_point",
    ".type limitless_suspend_point,@function",
    "limitless_suspend_point:",
    "mov [rdi + 0], rbx",
    "mov [rdi + 8], rbp",
    "mov [rdi + 16], r12",
    "mov [rdi + 24], r13",
    "mov [rdi + 32], r14",
    "mov [rdi + 40], r15",
    "lea rax, [rsp + 8]",
    "mov [rdi + 48], rax",
    "mov rax, [rsp]",
    "mov [rdi + 56], rax",
    "stmxcsr [rdi + 64]",
    "mov dword ptr [rdi + 68], 0",
    "fnstcw [rdi + 68]",
    "sub rsp, 8",
    "call rsi",
    "add rsp, 8",
    "xor eax, eax",
    "ret",
    ".size limitless_suspend_point, . - limitless_suspend_point",
    "",
    ".globl limitless_resume",
    ".hidden limitless_resume",
    ".type limitless_resume,@function",
    "limitless_resume:",
    "ldmxcsr [rdi + 64]",
    "fldcw [rdi + 68]",
    "mov rbx, [rdi + 0]",
    "mov rbp, [rdi + 8]",
    "mov r12, [rdi + 16]",
    "mov r13, [rdi + 24]",
    "mov r14, [rdi + 32]",
    "mov r15, [rdi + 40]",
    "mov rsp, [rdi + 48]",
    "mov eax, 1",
    "jmp qword ptr [rdi + 56]",
    ".size limitless_resume, . - limitless_resume",
    "",
    // The signal return trampoline for handlers the agent installs with raw rt_sigaction.
    ".globl limitless_restore_rt",
    ".hidden limitless_restore_rt",
    ".type limitless_restore_rt,@function",
    "limitless_restore_rt:",
    "mov eax, 15",
    "syscall",
    "hlt",
    ".size limitless_restore_rt, . - limitless_restore_rt",
);

extern "C" {
    fn limitless_suspend_point(ctx: *mut Ctx, park: ParkFn) -> u64;
    fn limitless_resume(ctx: *const Ctx) -> !;
    fn limitless_restore_rt();
}

/// Saves the caller's context into `ctx` and calls `park(ctx)`. Returns 0 when `park`
/// returns; returns 1 when a restored thread [`resume`]s the context.
///
/// # Safety
/// `ctx` must stay valid (it is part of the image); `park` must be safe to call here.
#[inline(never)]
pub unsafe fn suspend_point(ctx: *mut Ctx, park: ParkFn) -> u64 {
    // SAFETY: forwarded to the caller; the assembly follows the SysV ABI.
    unsafe { limitless_suspend_point(ctx, park) }
}

/// Continues a saved context on the calling thread: its `suspend_point` returns 1.
///
/// # Safety
/// `ctx` must be a context saved by `suspend_point` whose stack frames are intact, and the
/// calling thread's TLS must already be that of the saved thread.
pub unsafe fn resume(ctx: *const Ctx) -> ! {
    // SAFETY: forwarded to the caller.
    unsafe { limitless_resume(ctx) }
}

/// Address of the `rt_sigreturn` trampoline (for `sa_restorer`).
pub fn restore_rt_addr() -> u64 {
    limitless_restore_rt as *const () as u64
}

/// Creates a thread with raw `clone(2)` that resumes `ctx`. Returns the new tid.
///
/// # Safety
/// `ctx` must be a saved context as for [`resume`], `tls` its thread's FS base, and
/// `ptid`/`ctid` its `pd->tid` (or null). The context must not be resumed twice.
pub unsafe fn clone_into(flags: usize, stack: usize, ptid: usize, ctid: usize, tls: usize, ctx: *const Ctx) -> isize {
    let ret: isize;
    // SAFETY: in the parent this is a plain system call. In the child, which starts on
    // `stack` with copies of these registers, only registers are used before `resume`
    // switches to the saved stack.
    unsafe {
        asm!(
            "syscall",
            "test rax, rax",
            "jnz 2f",
            "mov rdi, r9",
            "jmp {resume}",
            "2:",
            resume = sym limitless_resume,
            inlateout("rax") limitless_sys::nr::CLONE as isize => ret,
            in("rdi") flags,
            in("rsi") stack,
            in("rdx") ptid,
            in("r10") ctid,
            in("r8") tls,
            in("r9") ctx,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

/// Creates a thread with raw `clone(2)` that runs `f` on the stack that ends at `stack_top`,
/// with FS base `tls`. Returns the new tid, or a negative errno.
///
/// # Safety
/// `flags` must make a thread sharing this address space, and `stack_top` the end of
/// writable memory that nothing else uses. `f` must not return and must not use glibc
/// (which does not know this thread).
pub unsafe fn spawn(flags: usize, stack_top: usize, tls: usize, f: extern "C" fn() -> !) -> isize {
    // The context goes at the top of the new stack, which only the new thread uses: this
    // thread may return before the new one has read it. Below it, `f` starts as if called
    // (its stack pointer 8 past a 16-byte boundary) with the default MXCSR and x87 control
    // word.
    let at = (stack_top - core::mem::size_of::<Ctx>()) & !15;
    let ctx = Ctx { rsp: at as u64 - 8, rip: f as usize as u64, mxcsr: 0x1f80, fcw: 0x37f, ..Ctx::default() };
    // SAFETY: `at` lies in the caller's stack memory, aligned for a `Ctx`; the context
    // resumes `f` on that stack, once.
    unsafe {
        (at as *mut Ctx).write(ctx);
        clone_into(flags, at, 0, 0, tls, at as *const Ctx)
    }
}

/// The calling thread's TLS base, without a system call: the x86-64 TLS ABI keeps it at
/// `%fs:0`.
pub fn thread_pointer() -> u64 {
    let tp: u64;
    // SAFETY: every thread of the program has a TLS block whose first word points at
    // itself (glibc's threads, and the agent's manager, which sets it up so).
    unsafe { asm!("mov {}, qword ptr fs:0", out(reg) tp, options(nostack, readonly, preserves_flags)) };
    tp
}

/// Offsets into the kernel's `ucontext_t` on x86-64 (`uc_stack`, `uc_mcontext`,
/// `uc_sigmask`).
pub mod uc {
    pub const STACK_SP: usize = 16;
    pub const STACK_FLAGS: usize = 24;
    pub const STACK_SIZE: usize = 32;
    pub const RIP: usize = 40 + 16 * 8;
    pub const SIGMASK: usize = 296;
}
