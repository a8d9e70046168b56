//! Published BOF4 tables, agreement of the two modes, and option checks.

use super::*;
use crate::blockwise::codebook::Normalization;

/// Paper Table 6 (block size 64): BOF4 MAE, BOF4 MSE, BOF4-S MAE, BOF4-S MSE.
#[allow(clippy::excessive_precision)]
const TABLE6: [[f64; 16]; 4] = [
    [
        -1.0,
        -0.7026305794715881,
        -0.5272703766822815,
        -0.3946738243103027,
        -0.2832144796848297,
        -0.1835313588380814,
        -0.090308666229248,
        0.0,
        0.0789600014686584,
        0.1598792523145676,
        0.244986355304718,
        0.3372218906879425,
        0.441359281539917,
        0.565777063369751,
        0.7299178242683411,
        1.0,
    ],
    [
        -1.0,
        -0.7535245418548584,
        -0.579203724861145,
        -0.4385998845100403,
        -0.3167679905891418,
        -0.2059924453496933,
        -0.1015387624502182,
        0.0,
        0.0887245312333107,
        0.1793769598007202,
        0.2741499841213226,
        0.3758211433887482,
        0.4884937703609467,
        0.6187058687210083,
        0.7790452241897583,
        1.0,
    ],
    [
        -0.8018798232078552,
        -0.6076051592826843,
        -0.468828022480011,
        -0.3559602797031403,
        -0.2576169371604919,
        -0.1677481383085251,
        -0.0827366262674332,
        0.0,
        0.0789434835314751,
        0.1597966849803925,
        0.2448495477437973,
        0.3371480107307434,
        0.4412573873996735,
        0.5656819343566895,
        0.7298068404197693,
        1.0,
    ],
    [
        -0.8568463921546936,
        -0.6692874431610107,
        -0.5235266089439392,
        -0.4004882574081421,
        -0.2910638153553009,
        -0.1900092959403992,
        -0.0938529595732689,
        0.0,
        0.0887671709060669,
        0.1794802695512772,
        0.2743096053600311,
        0.3760197460651398,
        0.4886530041694641,
        0.6188603639602661,
        0.7791395783424377,
        1.0,
    ],
];

const CASES: [(Metric, Normalization); 4] = [
    (Metric::Mae, Normalization::Absmax),
    (Metric::Mse, Normalization::Absmax),
    (Metric::Mae, Normalization::SignedAbsmax),
    (Metric::Mse, Normalization::SignedAbsmax),
];

fn paper_pins(normalization: Normalization) -> Vec<f64> {
    match normalization {
        Normalization::Absmax => vec![-1.0, 0.0, 1.0],
        Normalization::SignedAbsmax => vec![0.0, 1.0],
    }
}

fn theoretical(block_size: usize, metric: Metric, normalization: Normalization) -> Optimized {
    let target = GaussianTarget::new(block_size, normalization, metric).unwrap();
    let options = OptimizeOptions {
        pinned: paper_pins(normalization),
        ..Default::default()
    };
    optimize(&target, &options).unwrap()
}

fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

#[test]
fn theoretical_mode_reproduces_table_6() {
    for ((metric, normalization), published) in CASES.iter().zip(TABLE6) {
        let t = std::time::Instant::now();
        let got = theoretical(64, *metric, *normalization);
        let diff = max_diff(&got.levels, &published);
        eprintln!(
            "{metric:?} {normalization:?}: {} iterations, {:?}, max diff {diff:.2e}, error {:.6e}",
            got.iterations,
            t.elapsed(),
            got.error
        );
        assert!(got.converged);
        assert!(
            diff < 1.5e-3,
            "{metric:?} {normalization:?}: {:?}",
            got.levels
        );
    }
}

/// A reproducible standard normal sample (Box-Muller over splitmix64).
fn gaussian_sample(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed;
    let mut next = || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    };
    (0..n)
        .map(|_| {
            let (u, v) = (1.0 - next(), next());
            ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
        })
        .collect()
}

#[test]
fn data_driven_mode_agrees_with_theory_on_gaussian_weights() {
    // Antithetic pairs (the sample and its negation) cancel the odd part of the sampling noise;
    // what is left is amplified by the fixed point's slow modes, hence 2^24 values.
    let data = gaussian_sample(1 << 24, 7);
    let negated: Vec<f32> = data.iter().map(|v| -v).collect();
    for (metric, normalization) in CASES {
        let mut hist = WeightHistogram::new(64, normalization, metric, 1.0, 0).unwrap();
        hist.add(&data).unwrap();
        hist.add(&negated).unwrap();
        let options = OptimizeOptions {
            pinned: paper_pins(normalization),
            ..Default::default()
        };
        let data_driven = optimize(&hist, &options).unwrap();
        let theory = theoretical(64, metric, normalization);
        let diff = max_diff(&data_driven.levels, &theory.levels);
        eprintln!("{metric:?} {normalization:?}: data vs theory {diff:.2e}");
        assert!(diff < 2e-3, "{metric:?} {normalization:?}");
        let rel = (data_driven.error - theory.error).abs() / theory.error;
        eprintln!("  relative error difference {rel:.2e}");
        assert!(
            rel < 2e-3,
            "error {} vs {}",
            data_driven.error,
            theory.error
        );
    }
}

#[test]
fn optimized_beats_nf4_and_signed_beats_absmax() {
    let nf4: Vec<f64> = crate::blockwise::codebook::NF4
        .iter()
        .map(|&v| v as f64)
        .collect();
    for bs in [32, 64, 128, 256] {
        let nf4_err = expected_error(&nf4, bs, Metric::Mse, Normalization::Absmax).unwrap();
        let bof4 = theoretical(bs, Metric::Mse, Normalization::Absmax);
        let bof4s = theoretical(bs, Metric::Mse, Normalization::SignedAbsmax);
        assert!(bof4s.error < bof4.error && bof4.error < nf4_err, "bs={bs}");
    }
}

#[test]
fn unpinned_and_other_bit_widths_converge() {
    let target = GaussianTarget::new(128, Normalization::Absmax, Metric::Mse).unwrap();
    for bits in [2, 3, 5, 8] {
        let got = optimize(
            &target,
            &OptimizeOptions {
                bits,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(got.levels.len(), 1 << bits);
        assert!(got.levels.windows(2).all(|w| w[0] <= w[1]));
        // Symmetric target, symmetric start: symmetric result.
        let asym = got
            .levels
            .iter()
            .zip(got.levels.iter().rev())
            .map(|(a, b)| (a + b).abs())
            .fold(0.0, f64::max);
        assert!(asym < 1e-7, "bits={bits}: {asym}");
    }
}

#[test]
fn bad_options_are_named() {
    let target = GaussianTarget::new(64, Normalization::Absmax, Metric::Mse).unwrap();
    let bad = [
        (
            OptimizeOptions {
                bits: 1,
                ..Default::default()
            },
            "bits",
        ),
        (
            OptimizeOptions {
                pinned: vec![1.5],
                ..Default::default()
            },
            "pinned",
        ),
        (
            OptimizeOptions {
                pinned: vec![0.0, 0.0],
                ..Default::default()
            },
            "pinned",
        ),
        (
            OptimizeOptions {
                init: Some(vec![0.0; 3]),
                ..Default::default()
            },
            "init",
        ),
        (
            OptimizeOptions {
                tolerance: 0.0,
                ..Default::default()
            },
            "tolerance",
        ),
        (
            OptimizeOptions {
                max_iterations: 0,
                ..Default::default()
            },
            "max_iterations",
        ),
    ];
    for (options, name) in bad {
        match optimize(&target, &options) {
            Err(crate::Error::InvalidArgument { name: got, .. }) => assert_eq!(got, name),
            other => panic!("{name}: {other:?}"),
        }
    }
}
