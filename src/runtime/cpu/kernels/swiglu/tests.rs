//! SwiGLU and its backward against their references (f32 loosely, f64
//! tightly) and against finite differences of the forward.

use super::super::testutil::{assert_close, check_fd, dot, rand64, to_f32, to_f64, Rng};
use super::*;

#[test]
fn swiglu_matches_reference() {
    let mut rng = Rng(20);
    let g = rng.tensor(&[3, 11]);
    let u = rng.tensor(&[3, 11]);
    let got = swiglu(&g, &u).unwrap();
    let want = reference::swiglu(&g.to_f64_vec(), &u.to_f64_vec());
    assert_close(&got.to_f64_vec(), &want, 1e-6, "swiglu");
    // Longer than one task's chunk and the 8-lane blocks, in f64.
    let g = rng.tensor(&[3, 9001]);
    let u = rng.tensor(&[3, 9001]);
    let want = reference::swiglu(&g.to_f64_vec(), &u.to_f64_vec());
    let got = swiglu(&to_f64(&g), &to_f64(&u)).unwrap();
    assert_eq!(got.dtype, DType::F64);
    assert_close(&got.to_f64_vec(), &want, 1e-14, "f64 swiglu");
    let got = swiglu(&g, &u).unwrap();
    assert_close(&got.to_f64_vec(), &want, 1e-6, "f32 swiglu");
    assert!(swiglu(&g, &rng.tensor(&[11, 3]))
        .unwrap_err()
        .contains("same shape"));
}

#[test]
fn swiglu_grad_matches_reference() {
    let mut rng = Rng(18);
    for shape in [vec![2, 3, 6], vec![3, 9001]] {
        let g = rand64(&mut rng, &shape);
        let u = rand64(&mut rng, &shape);
        let dy = rand64(&mut rng, &shape);
        let (want_dg, want_du) =
            reference::swiglu_grad(&g.to_f64_vec(), &u.to_f64_vec(), &dy.to_f64_vec());
        let (dg, du) = swiglu_grad(&g, &u, &dy).unwrap();
        assert_close(
            &dg.to_f64_vec(),
            &want_dg,
            1e-14,
            &format!("dgate {shape:?}"),
        );
        assert_close(&du.to_f64_vec(), &want_du, 1e-14, &format!("dup {shape:?}"));
        let (dg, du) = swiglu_grad(&to_f32(&g), &to_f32(&u), &to_f32(&dy)).unwrap();
        assert_eq!(dg.dtype, DType::F32);
        assert_close(
            &dg.to_f64_vec(),
            &want_dg,
            1e-6,
            &format!("f32 dgate {shape:?}"),
        );
        assert_close(
            &du.to_f64_vec(),
            &want_du,
            1e-6,
            &format!("f32 dup {shape:?}"),
        );
    }
}

#[test]
fn swiglu_grad_matches_finite_differences() {
    let mut rng = Rng(17);
    let g = rand64(&mut rng, &[2, 3, 6]);
    let u = rand64(&mut rng, &[2, 3, 6]);
    let r = rand64(&mut rng, &[2, 3, 6]);
    let (dg, du) = swiglu_grad(&g, &u, &r).unwrap();
    let eg = check_fd("SwiGlu dgate", &g, &dg, |g| {
        dot(&swiglu(g, &u).unwrap(), &r)
    });
    let eu = check_fd("SwiGlu dup", &u, &du, |u| dot(&swiglu(&g, u).unwrap(), &r));
    eprintln!("SwiGlu max rel err vs FD: dgate {eg:.2e}, dup {eu:.2e}");
    assert!(swiglu_grad(&g, &u, &rand64(&mut rng, &[2, 6])).is_err());
}
