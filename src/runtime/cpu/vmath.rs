//! Vectorised f32 math for the kernels' hot loops: exp over score rows,
//! SiLU and its gradient, row maxima.
//!
//! Every kernel is written once over [`F8`], eight f32 lanes, and runs
//! either on AVX2 registers (picked at run time on x86-64) or on a plain
//! `[f32; 8]` elsewhere. Both perform the same IEEE operations in the same
//! order (separate multiplies and adds, never fused), so results do not
//! depend on the machine. A row's tail is padded to eight lanes in a
//! scratch block; reductions keep eight partial sums, combined in a fixed
//! order.

/// Eight f32 lanes and the operations the kernels need.
trait F8: Copy {
    fn load(x: &[f32; 8]) -> Self;
    fn store(self, out: &mut [f32; 8]);
    fn splat(x: f32) -> Self;
    fn add(self, o: Self) -> Self;
    fn sub(self, o: Self) -> Self;
    fn mul(self, o: Self) -> Self;
    fn div(self, o: Self) -> Self;
    /// `self > o ? self : o` per lane (so a NaN in `o` survives).
    fn max(self, o: Self) -> Self;
    /// `self < o ? self : o` per lane.
    fn min(self, o: Self) -> Self;
    /// Per lane: `x < lo ? 0 : (x > hi ? +inf : self)`.
    fn saturate(self, x: Self, lo: f32, hi: f32) -> Self;
    /// 2ⁿ from `t = n + 1.5·2²³` (n an integer in [−126, 127]).
    fn pow2_magic(t: Self) -> Self;
}

/// The portable lanes.
#[derive(Clone, Copy)]
struct Lanes([f32; 8]);

impl Lanes {
    #[inline(always)]
    fn map2(self, o: Self, f: impl Fn(f32, f32) -> f32) -> Self {
        let mut r = [0.0; 8];
        for ((r, &a), &b) in r.iter_mut().zip(&self.0).zip(&o.0) {
            *r = f(a, b);
        }
        Lanes(r)
    }
}

impl F8 for Lanes {
    #[inline(always)]
    fn load(x: &[f32; 8]) -> Self {
        Lanes(*x)
    }
    #[inline(always)]
    fn store(self, out: &mut [f32; 8]) {
        *out = self.0;
    }
    #[inline(always)]
    fn splat(x: f32) -> Self {
        Lanes([x; 8])
    }
    #[inline(always)]
    fn add(self, o: Self) -> Self {
        self.map2(o, |a, b| a + b)
    }
    #[inline(always)]
    fn sub(self, o: Self) -> Self {
        self.map2(o, |a, b| a - b)
    }
    #[inline(always)]
    fn mul(self, o: Self) -> Self {
        self.map2(o, |a, b| a * b)
    }
    #[inline(always)]
    fn div(self, o: Self) -> Self {
        self.map2(o, |a, b| a / b)
    }
    #[inline(always)]
    fn max(self, o: Self) -> Self {
        self.map2(o, |a, b| if a > b { a } else { b })
    }
    #[inline(always)]
    fn min(self, o: Self) -> Self {
        self.map2(o, |a, b| if a < b { a } else { b })
    }
    #[inline(always)]
    fn saturate(self, x: Self, lo: f32, hi: f32) -> Self {
        self.map2(x, |e, x| {
            if x < lo {
                0.0
            } else if x > hi {
                f32::INFINITY
            } else {
                e
            }
        })
    }
    #[inline(always)]
    fn pow2_magic(t: Self) -> Self {
        let mut r = [0.0; 8];
        for (r, &t) in r.iter_mut().zip(&t.0) {
            *r = f32::from_bits(t.to_bits().wrapping_add(127) << 23);
        }
        Lanes(r)
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::F8;
    use std::arch::x86_64::*;

    /// AVX2 lanes. Only built inside functions compiled with
    /// `target_feature(enable = "avx2,fma")` and called after the CPU was
    /// checked, which is what makes the intrinsics below sound.
    #[derive(Clone, Copy)]
    pub(super) struct Avx(__m256);

    // SAFETY (all methods): the intrinsics need AVX/AVX2, which every
    // caller has checked (see `Avx`); loads and stores go through 8-element
    // arrays, so they are in bounds.
    impl F8 for Avx {
        #[inline(always)]
        fn load(x: &[f32; 8]) -> Self {
            unsafe { Avx(_mm256_loadu_ps(x.as_ptr())) }
        }
        #[inline(always)]
        fn store(self, out: &mut [f32; 8]) {
            unsafe { _mm256_storeu_ps(out.as_mut_ptr(), self.0) }
        }
        #[inline(always)]
        fn splat(x: f32) -> Self {
            unsafe { Avx(_mm256_set1_ps(x)) }
        }
        #[inline(always)]
        fn add(self, o: Self) -> Self {
            unsafe { Avx(_mm256_add_ps(self.0, o.0)) }
        }
        #[inline(always)]
        fn sub(self, o: Self) -> Self {
            unsafe { Avx(_mm256_sub_ps(self.0, o.0)) }
        }
        #[inline(always)]
        fn mul(self, o: Self) -> Self {
            unsafe { Avx(_mm256_mul_ps(self.0, o.0)) }
        }
        #[inline(always)]
        fn div(self, o: Self) -> Self {
            unsafe { Avx(_mm256_div_ps(self.0, o.0)) }
        }
        #[inline(always)]
        fn max(self, o: Self) -> Self {
            // maxps returns its second operand unless the first is greater.
            unsafe { Avx(_mm256_max_ps(self.0, o.0)) }
        }
        #[inline(always)]
        fn min(self, o: Self) -> Self {
            unsafe { Avx(_mm256_min_ps(self.0, o.0)) }
        }
        #[inline(always)]
        fn saturate(self, x: Self, lo: f32, hi: f32) -> Self {
            unsafe {
                let under = _mm256_cmp_ps::<_CMP_LT_OQ>(x.0, _mm256_set1_ps(lo));
                let over = _mm256_cmp_ps::<_CMP_GT_OQ>(x.0, _mm256_set1_ps(hi));
                let e = _mm256_andnot_ps(under, self.0);
                Avx(_mm256_blendv_ps(e, _mm256_set1_ps(f32::INFINITY), over))
            }
        }
        #[inline(always)]
        fn pow2_magic(t: Self) -> Self {
            unsafe {
                let bits = _mm256_add_epi32(_mm256_castps_si256(t.0), _mm256_set1_epi32(127));
                Avx(_mm256_castsi256_ps(_mm256_slli_epi32::<23>(bits)))
            }
        }
    }
}

/// Defines `pub fn NAME(args)` that runs the generic kernel `IMP::<L>` on
/// AVX2 lanes when the CPU has them, else on portable lanes.
macro_rules! dispatch {
    ($(#[$m:meta])* pub fn $name:ident = $imp:ident($($a:ident: $t:ty),* $(,)?) $(-> $r:ty)?) => {
        $(#[$m])*
        pub fn $name($($a: $t),*) $(-> $r)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn wide($($a: $t),*) $(-> $r)? {
                    $imp::<avx2::Avx>($($a),*)
                }
                if has_avx2() {
                    // SAFETY: the CPU supports the features `wide` was
                    // compiled for (checked just above).
                    return unsafe { wide($($a),*) };
                }
            }
            $imp::<Lanes>($($a),*)
        }
    };
}

#[cfg(target_arch = "x86_64")]
#[inline]
fn has_avx2() -> bool {
    std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
}

/// The exp of eight lanes: Cody–Waite reduction to r ∈ [−ln2/2, ln2/2],
/// Cephes' degree-6 polynomial, 2ⁿ built in the exponent bits. Relative
/// error ≲ 2e-7 (a couple of ulps). Arguments below −87 (results under
/// 1e-38) give 0, above 88 give +inf; NaN stays NaN.
#[inline(always)]
fn exp8<L: F8>(x: L) -> L {
    // 1.5·2²³: adding it rounds to an integer, held in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    let xc = L::splat(-87.0).max(x).min_rev(88.0);
    let t = xc
        .mul(L::splat(std::f32::consts::LOG2_E))
        .add(L::splat(MAGIC));
    let n = t.sub(L::splat(MAGIC));
    let r = xc
        .sub(n.mul(L::splat(0.693_359_4)))
        .sub(n.mul(L::splat(-2.121_944_4e-4)));
    let mut p = L::splat(1.987_569_1e-4);
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        0.166_666_65,
        0.5,
    ] {
        p = p.mul(r).add(L::splat(c));
    }
    let y = p.mul(r).mul(r).add(r).add(L::splat(1.0));
    y.mul(L::pow2_magic(t)).saturate(x, -87.0, 88.0)
}

trait MinRev: F8 {
    /// `hi < self ? hi : self`, keeping a NaN in self.
    #[inline(always)]
    fn min_rev(self, hi: f32) -> Self {
        Self::splat(hi).min(self)
    }
}
impl<L: F8> MinRev for L {}

/// `1 / (1 + e^−g)`.
#[inline(always)]
fn sigmoid8<L: F8>(g: L) -> L {
    let one = L::splat(1.0);
    one.div(one.add(exp8(L::splat(0.0).sub(g))))
}

/// The scalar exp, same arithmetic as the lanes.
pub fn exp(x: f32) -> f32 {
    let mut b = [x; 8];
    exp8(Lanes::load(&b)).store(&mut b);
    b[0]
}

// The kernels below use no closures: a closure is compiled without the
// caller's target features, so the intrinsics inside it would not inline.

/// A row's tail (under eight values) copied into a block padded with `pad`.
#[inline(always)]
fn tail_block(rest: &[f32], pad: f32) -> [f32; 8] {
    let mut b = [pad; 8];
    b[..rest.len()].copy_from_slice(rest);
    b
}

/// Sums eight partial sums in a fixed order.
#[inline(always)]
fn hsum<L: F8>(acc: L) -> f32 {
    let mut a = [0.0; 8];
    acc.store(&mut a);
    ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]))
}

#[inline(always)]
fn block<const N: usize>(x: &[f32]) -> &[f32; N] {
    x.try_into().expect("a block of 8")
}

#[inline(always)]
fn block_mut<const N: usize>(x: &mut [f32]) -> &mut [f32; N] {
    x.try_into().expect("a block of 8")
}

#[inline(always)]
fn exp_sub_imp<L: F8>(row: &mut [f32], shift: f32) {
    let s = L::splat(shift);
    let mut chunks = row.chunks_exact_mut(8);
    for c in &mut chunks {
        let c = block_mut(c);
        exp8(L::load(c).sub(s)).store(c);
    }
    let rest = chunks.into_remainder();
    if !rest.is_empty() {
        let mut b = tail_block(rest, 0.0);
        exp8(L::load(&b).sub(s)).store(&mut b);
        let n = rest.len();
        rest.copy_from_slice(&b[..n]);
    }
}

#[inline(always)]
fn exp_sub_sum_imp<L: F8>(row: &mut [f32], shift: f32) -> f32 {
    let s = L::splat(shift);
    let mut acc = L::splat(0.0);
    let mut chunks = row.chunks_exact_mut(8);
    for c in &mut chunks {
        let c = block_mut(c);
        let e = exp8(L::load(c).sub(s));
        acc = acc.add(e);
        e.store(c);
    }
    let rest = chunks.into_remainder();
    if !rest.is_empty() {
        // Padding with −inf makes the extra lanes add exp(−inf) = 0.
        let mut b = tail_block(rest, f32::NEG_INFINITY);
        let e = exp8(L::load(&b).sub(s));
        acc = acc.add(e);
        e.store(&mut b);
        let n = rest.len();
        rest.copy_from_slice(&b[..n]);
    }
    hsum(acc)
}

#[inline(always)]
fn max_imp<L: F8>(row: &[f32]) -> f32 {
    let mut acc = L::splat(f32::NEG_INFINITY);
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        acc = L::load(block(c)).max(acc);
    }
    acc = L::load(&tail_block(chunks.remainder(), f32::NEG_INFINITY)).max(acc);
    let mut a = [0.0; 8];
    acc.store(&mut a);
    let mut m = f32::NEG_INFINITY;
    for x in a {
        m = if x > m { x } else { m };
    }
    m
}

#[inline(always)]
fn silu_mul8<L: F8>(g: &[f32; 8], u: &[f32; 8], o: &mut [f32; 8]) {
    let g = L::load(g);
    g.mul(sigmoid8(g)).mul(L::load(u)).store(o)
}

#[inline(always)]
fn silu_mul_imp<L: F8>(g: &[f32], u: &[f32], out: &mut [f32]) {
    let n = g.len().min(u.len()).min(out.len());
    let full = n / 8 * 8;
    for i in (0..full).step_by(8) {
        silu_mul8::<L>(
            block(&g[i..i + 8]),
            block(&u[i..i + 8]),
            block_mut(&mut out[i..i + 8]),
        );
    }
    if full < n {
        let mut o = [0.0; 8];
        silu_mul8::<L>(
            &tail_block(&g[full..n], 0.0),
            &tail_block(&u[full..n], 0.0),
            &mut o,
        );
        out[full..n].copy_from_slice(&o[..n - full]);
    }
}

#[inline(always)]
fn silu_imp<L: F8>(g: &[f32], out: &mut [f32]) {
    let n = g.len().min(out.len());
    let full = n / 8 * 8;
    for i in (0..full).step_by(8) {
        let x = L::load(block(&g[i..i + 8]));
        x.mul(sigmoid8(x)).store(block_mut(&mut out[i..i + 8]));
    }
    if full < n {
        let mut o = [0.0; 8];
        let x = L::load(&tail_block(&g[full..n], 0.0));
        x.mul(sigmoid8(x)).store(&mut o);
        out[full..n].copy_from_slice(&o[..n - full]);
    }
}

#[inline(always)]
fn swiglu_grad8<L: F8>(
    g: &[f32; 8],
    u: &[f32; 8],
    d: &[f32; 8],
    dg: &mut [f32; 8],
    du: &mut [f32; 8],
) {
    let one = L::splat(1.0);
    let g = L::load(g);
    let d = L::load(d);
    let s = sigmoid8(g);
    d.mul(g.mul(s)).store(du);
    let t = one.add(g.mul(one.sub(s)));
    d.mul(L::load(u)).mul(s).mul(t).store(dg)
}

#[inline(always)]
fn swiglu_grad_imp<L: F8>(g: &[f32], u: &[f32], dy: &[f32], dg: &mut [f32], du: &mut [f32]) {
    let n = g
        .len()
        .min(u.len())
        .min(dy.len())
        .min(dg.len())
        .min(du.len());
    let full = n / 8 * 8;
    for i in (0..full).step_by(8) {
        swiglu_grad8::<L>(
            block(&g[i..i + 8]),
            block(&u[i..i + 8]),
            block(&dy[i..i + 8]),
            block_mut(&mut dg[i..i + 8]),
            block_mut(&mut du[i..i + 8]),
        );
    }
    if full < n {
        let (mut a, mut b) = ([0.0; 8], [0.0; 8]);
        swiglu_grad8::<L>(
            &tail_block(&g[full..n], 0.0),
            &tail_block(&u[full..n], 0.0),
            &tail_block(&dy[full..n], 0.0),
            &mut a,
            &mut b,
        );
        dg[full..n].copy_from_slice(&a[..n - full]);
        du[full..n].copy_from_slice(&b[..n - full]);
    }
}

#[inline(always)]
fn scale_imp<L: F8>(row: &mut [f32], a: f32) {
    let av = L::splat(a);
    let mut chunks = row.chunks_exact_mut(8);
    for c in &mut chunks {
        let c = block_mut(c);
        L::load(c).mul(av).store(c);
    }
    for x in chunks.into_remainder() {
        *x *= a;
    }
}

dispatch! {
    /// `x ← exp(x − shift)` over a row.
    pub fn exp_sub = exp_sub_imp(row: &mut [f32], shift: f32)
}
dispatch! {
    /// `x ← exp(x − shift)` over a row; returns the sum of the new values
    /// (eight partial sums, combined in a fixed order).
    pub fn exp_sub_sum = exp_sub_sum_imp(row: &mut [f32], shift: f32) -> f32
}
dispatch! {
    /// The largest element (−inf for an empty row; NaNs are skipped, as
    /// `f32::max` does).
    pub fn max = max_imp(row: &[f32]) -> f32
}
dispatch! {
    /// `out = silu(g) · u` with silu(g) = g·sigmoid(g).
    pub fn silu_mul = silu_mul_imp(g: &[f32], u: &[f32], out: &mut [f32])
}
dispatch! {
    /// `out = silu(g)` (for callers that round it before the product).
    pub fn silu = silu_imp(g: &[f32], out: &mut [f32])
}
dispatch! {
    /// The SwiGLU backward: with s = sigmoid(g), `du = dy·(g·s)` and
    /// `dg = dy·u·s·(1 + g·(1 − s))`.
    pub fn swiglu_grad = swiglu_grad_imp(g: &[f32], u: &[f32], dy: &[f32], dg: &mut [f32], du: &mut [f32])
}
dispatch! {
    /// `x ← x · a` over a row.
    pub fn scale = scale_imp(row: &mut [f32], a: f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate_over_its_range() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.013;
        }
        assert!(worst < 3e-7, "worst relative error {worst:e}");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn slice_functions_match_the_scalar_definitions() {
        let xs: Vec<f32> = (0..37).map(|i| (i as f32 * 0.71).sin() * 9.0).collect();
        let mut row = xs.clone();
        let sum = exp_sub_sum(&mut row, 2.5);
        let mut want_sum = 0.0f64;
        for (r, &x) in row.iter().zip(&xs) {
            assert_eq!(*r, exp(x - 2.5));
            want_sum += *r as f64;
        }
        assert!((sum as f64 - want_sum).abs() < 1e-5 * want_sum);
        let mut row2 = xs.clone();
        exp_sub(&mut row2, 2.5);
        assert_eq!(row, row2);
        assert_eq!(
            max(&xs),
            xs.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b))
        );
        assert_eq!(max(&[]), f32::NEG_INFINITY);

        let u: Vec<f32> = xs.iter().map(|x| x * 0.3 - 1.0).collect();
        let dy: Vec<f32> = xs.iter().map(|x| 0.5 - x * 0.1).collect();
        let mut out = vec![0.0; xs.len()];
        silu_mul(&xs, &u, &mut out);
        let mut s = vec![0.0; xs.len()];
        silu(&xs, &mut s);
        let (mut dg, mut du) = (vec![0.0; xs.len()], vec![0.0; xs.len()]);
        swiglu_grad(&xs, &u, &dy, &mut dg, &mut du);
        for i in 0..xs.len() {
            let (g, uu, d) = (xs[i] as f64, u[i] as f64, dy[i] as f64);
            let sg = 1.0 / (1.0 + (-g).exp());
            let close = |a: f32, b: f64| (a as f64 - b).abs() <= 1e-6 * (1.0 + b.abs());
            assert!(close(out[i], g * sg * uu), "silu_mul at {i}");
            assert!(close(s[i], g * sg), "silu at {i}");
            assert!(close(du[i], d * g * sg), "du at {i}");
            assert!(
                close(dg[i], d * uu * sg * (1.0 + g * (1.0 - sg))),
                "dg at {i}"
            );
        }
    }

    #[test]
    fn portable_and_avx2_lanes_agree_bit_for_bit() {
        let xs: Vec<f32> = (0..203)
            .map(|i| (i as f32 * 0.37).cos() * 40.0 - 3.0)
            .collect();
        let u: Vec<f32> = xs.iter().map(|x| x * 0.1 + 0.5).collect();
        let run = |wide: bool| {
            let mut a = xs.clone();
            let mut out = vec![0.0; xs.len()];
            let (mut dg, mut du) = (vec![0.0; xs.len()], vec![0.0; xs.len()]);
            #[cfg(target_arch = "x86_64")]
            if wide && has_avx2() {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn all(
                    a: &mut [f32],
                    u: &[f32],
                    out: &mut [f32],
                    dg: &mut [f32],
                    du: &mut [f32],
                ) -> (f32, f32) {
                    let s = exp_sub_sum_imp::<avx2::Avx>(a, 1.5);
                    silu_mul_imp::<avx2::Avx>(u, a, out);
                    swiglu_grad_imp::<avx2::Avx>(u, a, out, dg, du);
                    (s, max_imp::<avx2::Avx>(a))
                }
                // SAFETY: the CPU has AVX2 and FMA (checked above).
                let r = unsafe { all(&mut a, &u, &mut out, &mut dg, &mut du) };
                return (a, out, dg, du, r.0, r.1);
            }
            let _ = wide;
            let sum = exp_sub_sum_imp::<Lanes>(&mut a, 1.5);
            silu_mul_imp::<Lanes>(&u, &a, &mut out);
            swiglu_grad_imp::<Lanes>(&u, &a, &out, &mut dg, &mut du);
            let m = max_imp::<Lanes>(&a);
            (a, out, dg, du, sum, m)
        };
        let (a, b) = (run(false), run(true));
        assert_eq!(a.0, b.0);
        assert_eq!(a.1, b.1);
        assert_eq!(a.2, b.2);
        assert_eq!(a.3, b.3);
        assert_eq!(a.4.to_bits(), b.4.to_bits());
        assert_eq!(a.5.to_bits(), b.5.to_bits());
    }

    #[test]
    fn nan_propagates() {
        let mut row = vec![1.0, f32::NAN, 0.5];
        let sum = exp_sub_sum(&mut row, 0.0);
        assert!(sum.is_nan() && row[1].is_nan());
        let mut out = vec![0.0; 1];
        silu_mul(&[f32::NAN], &[1.0], &mut out);
        assert!(out[0].is_nan());
    }
}
