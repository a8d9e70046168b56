//! Output buffers. Large zeroed buffers come straight from the OS (already zero, untouched) and
//! are marked for transparent huge pages, so the kernels' first writes fault in 2 MiB pages
//! instead of 4 KiB ones: on a large tensor that fault cost is otherwise as large as the decode.

/// Buffers at least this large ask for huge pages.
const HUGE_PAGE_MIN_BYTES: usize = 4 << 20;

/// A zero-filled vector of `n` plain values, backed by huge pages where the OS allows.
pub fn zeroed_vec<T: ZeroedByOs>(n: usize) -> Vec<T> {
    let v = vec![T::ZERO; n];
    advise_huge_pages(v.as_ptr() as usize, n * std::mem::size_of::<T>());
    v
}

#[cfg(target_os = "linux")]
fn advise_huge_pages(addr: usize, len: usize) {
    if len < HUGE_PAGE_MIN_BYTES {
        return;
    }
    const HUGE: usize = 2 << 20;
    let start = addr.next_multiple_of(HUGE);
    let end = (addr + len) / HUGE * HUGE;
    if end > start {
        // SAFETY: the range lies inside a live allocation we own; MADV_HUGEPAGE only changes
        // how the kernel backs it, never its contents. Failure is harmless and ignored.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_huge_pages(_addr: usize, _len: usize) {}

/// Primitive types for which `vec![0; n]` is a calloc of untouched, OS-zeroed pages (std
/// specializes exactly these).
pub trait ZeroedByOs: Copy {
    const ZERO: Self;
}

impl ZeroedByOs for u8 {
    const ZERO: Self = 0;
}
impl ZeroedByOs for u16 {
    const ZERO: Self = 0;
}
impl ZeroedByOs for u32 {
    const ZERO: Self = 0;
}
impl ZeroedByOs for u64 {
    const ZERO: Self = 0;
}
impl ZeroedByOs for f32 {
    const ZERO: Self = 0.0;
}
