//! `memcpy`, `memmove`, `memset`, `memcmp`, `bcmp` for the freestanding
//! link (no libc; `compiler_builtins` does not export them for the host
//! target). Written with string instructions so the compiler cannot turn
//! them back into calls to themselves.

use core::arch::asm;

#[no_mangle]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    asm!("rep movsb", inout("rdi") dst => _, inout("rsi") src => _, inout("rcx") n => _, options(nostack, preserves_flags));
    dst
}

#[no_mangle]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) <= (src as usize) || (dst as usize) >= (src as usize + n) {
        return memcpy(dst, src, n);
    }
    // Overlapping with dst above src: copy backwards.
    asm!(
        "std",
        "rep movsb",
        "cld",
        inout("rdi") dst.add(n - 1) => _,
        inout("rsi") src.add(n - 1) => _,
        inout("rcx") n => _,
        options(nostack)
    );
    dst
}

#[no_mangle]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    asm!("rep stosb", inout("rdi") dst => _, inout("rcx") n => _, in("al") c as u8, options(nostack, preserves_flags));
    dst
}

#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        let x = core::ptr::read_volatile(a.add(i));
        let y = core::ptr::read_volatile(b.add(i));
        if x != y {
            return x as i32 - y as i32;
        }
        i += 1;
    }
    0
}

#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    memcmp(a, b, n)
}

/// The precompiled `core` (built with unwinding) references the personality
/// routine from its unwind tables. The guest is built with `panic = "abort"`
/// and discards `.eh_frame`, so this is never called.
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}
