//! The inner loops: dot products and `y += a * w` over f32 / f16 / bf16 weights with f32
//! activations and f32 accumulation, in AVX-512F, AVX2 (+FMA, F16C) and scalar versions.

use half::{bf16, f16};

use crate::Isa;

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// A weight element type: how it widens to f32, scalar and 8 or 16 lanes at a time.
pub trait Elem: Copy + Send + Sync + std::fmt::Debug + 'static {
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
    /// 8 elements at `p` as f32 lanes.
    ///
    /// # Safety
    /// `p..p + 8` readable; the CPU has AVX2, FMA and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> __m256;
    /// 16 elements at `p` as f32 lanes.
    ///
    /// # Safety
    /// `p..p + 16` readable; the CPU has AVX-512F.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> __m512;
}

impl Elem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const Self) -> __m256 {
        unsafe { _mm256_loadu_ps(p) }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(p: *const Self) -> __m512 {
        unsafe { _mm512_loadu_ps(p) }
    }
}

impl Elem for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const Self) -> __m256 {
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(p: *const Self) -> __m512 {
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)) }
    }
}

impl Elem for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
    // bf16 is the top half of an f32: widen to 32 bits and shift left by 16.
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const Self) -> __m256 {
        unsafe {
            let w = _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i));
            _mm256_castsi256_ps(_mm256_slli_epi32(w, 16))
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(p: *const Self) -> __m512 {
        unsafe {
            let w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i));
            _mm512_castsi512_ps(_mm512_slli_epi32(w, 16))
        }
    }
}

/// `sum_i w[i] * x[i]` (`w` and `x` of equal length).
#[inline]
pub fn dot<T: Elem>(isa: Isa, w: &[T], x: &[f32]) -> f32 {
    assert_eq!(w.len(), x.len(), "dot: lengths differ");
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa` only names an instruction set the CPU was found to have.
        Isa::Avx512 => unsafe { dot_avx512(w, x) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { dot_avx2(w, x) },
        _ => dot_scalar(w, x),
    }
}

/// `y[i] += a * w[i]` (`w` and `y` of equal length).
#[inline]
pub fn axpy<T: Elem>(isa: Isa, a: f32, w: &[T], y: &mut [f32]) {
    assert_eq!(w.len(), y.len(), "axpy: lengths differ");
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `dot`.
        Isa::Avx512 => unsafe { axpy_avx512(a, w, y) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { axpy_avx2(a, w, y) },
        _ => axpy_scalar(a, w, y),
    }
}

fn dot_scalar<T: Elem>(w: &[T], x: &[f32]) -> f32 {
    // Four partial sums, like the vector versions (and a little faster than one).
    let mut acc = [0f32; 4];
    let mut cw = w.chunks_exact(4);
    let mut cx = x.chunks_exact(4);
    for (a, b) in (&mut cw).zip(&mut cx) {
        for k in 0..4 {
            acc[k] += a[k].to_f32() * b[k];
        }
    }
    let mut s = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    for (a, b) in cw.remainder().iter().zip(cx.remainder()) {
        s += a.to_f32() * b;
    }
    s
}

fn axpy_scalar<T: Elem>(a: f32, w: &[T], y: &mut [f32]) {
    for (y, w) in y.iter_mut().zip(w) {
        *y += a * w.to_f32();
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_avx512<T: Elem>(w: &[T], x: &[f32]) -> f32 {
    let n = w.len();
    let (pw, px) = (w.as_ptr(), x.as_ptr());
    let mut i = 0;
    unsafe {
        let (mut a0, mut a1, mut a2, mut a3) = (
            _mm512_setzero_ps(),
            _mm512_setzero_ps(),
            _mm512_setzero_ps(),
            _mm512_setzero_ps(),
        );
        while i + 64 <= n {
            a0 = _mm512_fmadd_ps(T::load16(pw.add(i)), _mm512_loadu_ps(px.add(i)), a0);
            a1 = _mm512_fmadd_ps(T::load16(pw.add(i + 16)), _mm512_loadu_ps(px.add(i + 16)), a1);
            a2 = _mm512_fmadd_ps(T::load16(pw.add(i + 32)), _mm512_loadu_ps(px.add(i + 32)), a2);
            a3 = _mm512_fmadd_ps(T::load16(pw.add(i + 48)), _mm512_loadu_ps(px.add(i + 48)), a3);
            i += 64;
        }
        while i + 16 <= n {
            a0 = _mm512_fmadd_ps(T::load16(pw.add(i)), _mm512_loadu_ps(px.add(i)), a0);
            i += 16;
        }
        let mut s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
        while i < n {
            s += (*pw.add(i)).to_f32() * *px.add(i);
            i += 1;
        }
        s
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_avx2<T: Elem>(w: &[T], x: &[f32]) -> f32 {
    let n = w.len();
    let (pw, px) = (w.as_ptr(), x.as_ptr());
    let mut i = 0;
    unsafe {
        let (mut a0, mut a1, mut a2, mut a3) = (
            _mm256_setzero_ps(),
            _mm256_setzero_ps(),
            _mm256_setzero_ps(),
            _mm256_setzero_ps(),
        );
        while i + 32 <= n {
            a0 = _mm256_fmadd_ps(T::load8(pw.add(i)), _mm256_loadu_ps(px.add(i)), a0);
            a1 = _mm256_fmadd_ps(T::load8(pw.add(i + 8)), _mm256_loadu_ps(px.add(i + 8)), a1);
            a2 = _mm256_fmadd_ps(T::load8(pw.add(i + 16)), _mm256_loadu_ps(px.add(i + 16)), a2);
            a3 = _mm256_fmadd_ps(T::load8(pw.add(i + 24)), _mm256_loadu_ps(px.add(i + 24)), a3);
            i += 32;
        }
        while i + 8 <= n {
            a0 = _mm256_fmadd_ps(T::load8(pw.add(i)), _mm256_loadu_ps(px.add(i)), a0);
            i += 8;
        }
        let v = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
        let lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
        let lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
        let mut s = _mm_cvtss_f32(lo);
        while i < n {
            s += (*pw.add(i)).to_f32() * *px.add(i);
            i += 1;
        }
        s
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn axpy_avx512<T: Elem>(a: f32, w: &[T], y: &mut [f32]) {
    let n = w.len();
    let (pw, py) = (w.as_ptr(), y.as_mut_ptr());
    let mut i = 0;
    unsafe {
        let va = _mm512_set1_ps(a);
        while i + 32 <= n {
            let y0 = _mm512_fmadd_ps(va, T::load16(pw.add(i)), _mm512_loadu_ps(py.add(i)));
            let y1 = _mm512_fmadd_ps(va, T::load16(pw.add(i + 16)), _mm512_loadu_ps(py.add(i + 16)));
            _mm512_storeu_ps(py.add(i), y0);
            _mm512_storeu_ps(py.add(i + 16), y1);
            i += 32;
        }
        while i + 16 <= n {
            _mm512_storeu_ps(
                py.add(i),
                _mm512_fmadd_ps(va, T::load16(pw.add(i)), _mm512_loadu_ps(py.add(i))),
            );
            i += 16;
        }
        while i < n {
            *py.add(i) += a * (*pw.add(i)).to_f32();
            i += 1;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn axpy_avx2<T: Elem>(a: f32, w: &[T], y: &mut [f32]) {
    let n = w.len();
    let (pw, py) = (w.as_ptr(), y.as_mut_ptr());
    let mut i = 0;
    unsafe {
        let va = _mm256_set1_ps(a);
        while i + 16 <= n {
            let y0 = _mm256_fmadd_ps(va, T::load8(pw.add(i)), _mm256_loadu_ps(py.add(i)));
            let y1 = _mm256_fmadd_ps(va, T::load8(pw.add(i + 8)), _mm256_loadu_ps(py.add(i + 8)));
            _mm256_storeu_ps(py.add(i), y0);
            _mm256_storeu_ps(py.add(i + 8), y1);
            i += 16;
        }
        while i + 8 <= n {
            _mm256_storeu_ps(
                py.add(i),
                _mm256_fmadd_ps(va, T::load8(pw.add(i)), _mm256_loadu_ps(py.add(i))),
            );
            i += 8;
        }
        while i < n {
            *py.add(i) += a * (*pw.add(i)).to_f32();
            i += 1;
        }
    }
}

/// `y[i] += sum_k a[k] * w[k][i]`: `N` scaled rows (each as long as `y`) added in one pass, so
/// `y` is loaded and stored once per `N` rows instead of once per row.
#[inline]
pub fn axpy_rows<T: Elem, const N: usize>(isa: Isa, a: [f32; N], w: [&[T]; N], y: &mut [f32]) {
    for r in &w {
        assert_eq!(r.len(), y.len(), "axpy_rows: lengths differ");
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `dot`; lengths checked.
        Isa::Avx512 => unsafe { axpy_rows_avx512(a, w, y) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { axpy_rows_avx2(a, w, y) },
        _ => {
            for (i, y) in y.iter_mut().enumerate() {
                let mut s = *y;
                for k in 0..N {
                    s += a[k] * w[k][i].to_f32();
                }
                *y = s;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn axpy_rows_avx512<T: Elem, const N: usize>(a: [f32; N], w: [&[T]; N], y: &mut [f32]) {
    let n = y.len();
    let py = y.as_mut_ptr();
    let p = w.map(|r| r.as_ptr());
    unsafe {
        let va = a.map(|v| _mm512_set1_ps(v));
        let mut i = 0;
        while i + 16 <= n {
            let mut yv = _mm512_loadu_ps(py.add(i));
            for k in 0..N {
                yv = _mm512_fmadd_ps(va[k], T::load16(p[k].add(i)), yv);
            }
            _mm512_storeu_ps(py.add(i), yv);
            i += 16;
        }
        while i < n {
            let mut s = *py.add(i);
            for k in 0..N {
                s += a[k] * (*p[k].add(i)).to_f32();
            }
            *py.add(i) = s;
            i += 1;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn axpy_rows_avx2<T: Elem, const N: usize>(a: [f32; N], w: [&[T]; N], y: &mut [f32]) {
    let n = y.len();
    let py = y.as_mut_ptr();
    let p = w.map(|r| r.as_ptr());
    unsafe {
        let va = a.map(|v| _mm256_set1_ps(v));
        let mut i = 0;
        while i + 8 <= n {
            let mut yv = _mm256_loadu_ps(py.add(i));
            for k in 0..N {
                yv = _mm256_fmadd_ps(va[k], T::load8(p[k].add(i)), yv);
            }
            _mm256_storeu_ps(py.add(i), yv);
            i += 8;
        }
        while i < n {
            let mut s = *py.add(i);
            for k in 0..N {
                s += a[k] * (*p[k].add(i)).to_f32();
            }
            *py.add(i) = s;
            i += 1;
        }
    }
}

/// Asks the CPU to start loading the cache lines of `w` (a hint: no effect on any result), so
/// that a scattered read that comes next need not wait for memory one line at a time.
#[inline(always)]
pub fn prefetch<T>(w: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        let start = w.as_ptr() as usize & !63;
        let end = w.as_ptr() as usize + std::mem::size_of_val(w);
        let mut a = start;
        while a < end {
            // SAFETY: a prefetch never faults, whatever the address; SSE is baseline on x86_64.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(a as *const i8) };
            a += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = w;
}
