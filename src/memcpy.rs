//! A `memcpy` for the static musl build. musl's own copies every size of
//! 8 bytes and more with `rep movsq`, which costs tens of cycles to start,
//! and a request makes hundreds of small copies (header names and values,
//! head and log fields): under load it was 13.6 % of the musl build's
//! samples, against 2.4 % for glibc's `memcpy` in the glibc build (README,
//! "The static musl build"). `build.rs` links the musl binary with
//! `--wrap=memcpy`, which sends every call, musl's own included, to
//! [`__wrap_memcpy`]; copies of up to 128 bytes are done here with
//! overlapping unaligned moves, longer ones go on to musl's.
//!
//! No loop anywhere: the compiler turns copy loops into calls to `memcpy`,
//! which here would call this function again.

use std::ptr::{read_unaligned as load, write_unaligned as store};

/// Copies `n` bytes from `src` to `dst`; `long` copies more than 128.
///
/// # Safety
/// As `memcpy`: `src` readable and `dst` writable for `n` bytes, the two
/// not overlapping.
#[inline(always)]
pub unsafe fn copy(
    dst: *mut u8,
    src: *const u8,
    n: usize,
    long: unsafe extern "C" fn(*mut u8, *const u8, usize) -> *mut u8,
) -> *mut u8 {
    // SAFETY: every access below is within `src[..n]` or `dst[..n]`: each
    // branch reads and writes a head and a tail of the width it checked
    // `n` against, which overlap when `n` is less than twice that width.
    unsafe {
        if n <= 16 {
            if n >= 8 {
                let (a, b) = (load(src.cast::<u64>()), load(src.add(n - 8).cast::<u64>()));
                store(dst.cast::<u64>(), a);
                store(dst.add(n - 8).cast::<u64>(), b);
            } else if n >= 4 {
                let (a, b) = (load(src.cast::<u32>()), load(src.add(n - 4).cast::<u32>()));
                store(dst.cast::<u32>(), a);
                store(dst.add(n - 4).cast::<u32>(), b);
            } else if n >= 2 {
                let (a, b) = (load(src.cast::<u16>()), load(src.add(n - 2).cast::<u16>()));
                store(dst.cast::<u16>(), a);
                store(dst.add(n - 2).cast::<u16>(), b);
            } else if n == 1 {
                *dst = *src;
            }
        } else if n <= 32 {
            let (a, b) = (
                load(src.cast::<u128>()),
                load(src.add(n - 16).cast::<u128>()),
            );
            store(dst.cast::<u128>(), a);
            store(dst.add(n - 16).cast::<u128>(), b);
        } else if n <= 64 {
            let w = |i: usize| src.add(i).cast::<u128>();
            let (a, b, c, d) = (load(w(0)), load(w(16)), load(w(n - 32)), load(w(n - 16)));
            let v = |i: usize| dst.add(i).cast::<u128>();
            store(v(0), a);
            store(v(16), b);
            store(v(n - 32), c);
            store(v(n - 16), d);
        } else if n <= 128 {
            let w = |i: usize| src.add(i).cast::<u128>();
            let head = (load(w(0)), load(w(16)), load(w(32)), load(w(48)));
            let tail = (load(w(n - 64)), load(w(n - 48)), load(w(n - 32)));
            let last = load(w(n - 16));
            let v = |i: usize| dst.add(i).cast::<u128>();
            store(v(0), head.0);
            store(v(16), head.1);
            store(v(32), head.2);
            store(v(48), head.3);
            store(v(n - 64), tail.0);
            store(v(n - 48), tail.1);
            store(v(n - 32), tail.2);
            store(v(n - 16), last);
        } else {
            return long(dst, src, n);
        }
    }
    dst
}

#[cfg(target_env = "musl")]
unsafe extern "C" {
    /// musl's `memcpy`, under the name `--wrap` gives it.
    fn __real_memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8;
}

/// What every `memcpy` call in the musl binary reaches (see the module
/// documentation).
///
/// # Safety
/// As `memcpy`.
#[cfg(target_env = "musl")]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __wrap_memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller's, as for `memcpy`.
    unsafe { copy(dst, src, n, __real_memcpy) }
}

#[cfg(test)]
mod tests {
    use super::*;

    unsafe extern "C" fn long(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
        // SAFETY: as `copy`'s caller promised.
        unsafe { std::ptr::copy_nonoverlapping(src, dst, n) };
        dst
    }

    /// Every length up to past the fallback, at every alignment of both
    /// ends: exactly the bytes asked for are written, nothing around them.
    #[test]
    fn copies_exactly_the_bytes_asked_for() {
        let src: Vec<u8> = (0..400u32).map(|i| (i * 7 + 1) as u8).collect();
        for n in 0..=200 {
            for from in 0..8 {
                for to in 0..8 {
                    let mut dst = vec![0xEEu8; 400];
                    // SAFETY: both ranges are inside their buffers.
                    let back =
                        unsafe { copy(dst.as_mut_ptr().add(to), src.as_ptr().add(from), n, long) };
                    assert_eq!(back, dst[to..].as_mut_ptr());
                    assert_eq!(&dst[to..to + n], &src[from..from + n], "n {n}");
                    assert!(dst[..to].iter().all(|&b| b == 0xEE));
                    assert!(dst[to + n..].iter().all(|&b| b == 0xEE), "n {n}");
                }
            }
        }
    }
}
