//! The products of one step of the decoder (the projections that read one input, such as
//! q, k and v), run together: inputs prepared once per distinct [`InputKey`], then every
//! product's output rows split into tasks on the pool at once (one fork-join per step).

use super::linear::{Input, InputKey, Linear};
use crate::error::Result;
use crate::isa::Isa;
use rayon::prelude::*;

/// Most products one step runs together.
pub const MAX_PRODUCTS: usize = 3;
/// Weights per task, about (whole rows).
const TASK_WEIGHTS: usize = 1 << 15;
/// Steps up to this many weight-uses (weights times activation rows, up to four) run on the
/// calling thread.
const INLINE_WEIGHTS: usize = 1 << 14;

/// Reused buffers of the steps: one prepared input and one by-row output per product.
#[derive(Default)]
pub struct StepBuffers {
    inputs: [Input; MAX_PRODUCTS],
    by_row: [Vec<f32>; MAX_PRODUCTS],
}

impl StepBuffers {
    /// Buffers for outputs up to `max_out` features of `max_batch` rows.
    pub fn new(max_out: usize, max_batch: usize) -> StepBuffers {
        let mut b = StepBuffers::default();
        if max_batch > 1 {
            for v in &mut b.by_row {
                *v = crate::runtime::buffer::zeroed_vec(max_out * max_batch);
            }
        }
        b
    }
}

/// One product of a step.
struct Task<'a> {
    linear: &'a Linear,
    input: &'a Input,
    out: &'a mut [f32],
}

/// `outs[k] = x @ layers[k].T` (token-major: `[batch, out_features]`) for the `batch` rows of
/// `x`, all products together.
pub fn project(
    isa: Isa,
    x: &[f32],
    batch: usize,
    layers: &[&Linear],
    outs: &mut [&mut [f32]],
    buffers: &mut StepBuffers,
) -> Result<()> {
    let n = layers.len();
    assert!(n <= MAX_PRODUCTS && outs.len() == n);
    // The input of each product: its own, or an earlier one of the same key.
    let mut source = [0usize; MAX_PRODUCTS];
    let keys: [Option<InputKey>; MAX_PRODUCTS] =
        std::array::from_fn(|k| layers.get(k).map(|l| l.input_key()));
    for k in 0..n {
        source[k] = (0..k).find(|&j| keys[j] == keys[k]).unwrap_or(k);
        if source[k] == k {
            layers[k].prepare(isa, x, batch, &mut buffers.inputs[k])?;
        }
    }
    let StepBuffers { inputs, by_row } = buffers;
    let inputs = &*inputs;
    if batch == 1 {
        // By-row and token-major layouts coincide.
        let mut tasks: [Option<Task<'_>>; MAX_PRODUCTS] = [None, None, None];
        for (k, out) in outs.iter_mut().enumerate() {
            let out = &mut out[..layers[k].out_features()];
            tasks[k] = Some(Task {
                linear: layers[k],
                input: &inputs[source[k]],
                out,
            });
        }
        return run_tasks(isa, x, batch, &mut tasks);
    }
    let mut tasks: [Option<Task<'_>>; MAX_PRODUCTS] = [None, None, None];
    for (k, rows) in by_row.iter_mut().take(n).enumerate() {
        let out = &mut rows[..layers[k].out_features() * batch];
        tasks[k] = Some(Task {
            linear: layers[k],
            input: &inputs[source[k]],
            out,
        });
    }
    run_tasks(isa, x, batch, &mut tasks)?;
    for (task, out) in tasks.iter().flatten().zip(outs.iter_mut()) {
        let n_out = task.linear.out_features();
        for (o, row) in task.out.chunks_exact(batch).enumerate() {
            for (b, &v) in row.iter().enumerate() {
                out[b * n_out + o] = v;
            }
        }
    }
    Ok(())
}

/// Runs the tasks' products, split over output rows on the pool unless they are small.
fn run_tasks(isa: Isa, x: &[f32], batch: usize, tasks: &mut [Option<Task<'_>>]) -> Result<()> {
    let uses: usize = tasks
        .iter()
        .flatten()
        .map(|t| t.linear.out_features() * t.linear.in_features() * batch.min(4))
        .sum();
    let run = |task: &mut Option<Task<'_>>, parallel: bool| -> Result<()> {
        let Some(Task { linear, input, out }) = task else {
            return Ok(());
        };
        let rows = (TASK_WEIGHTS / linear.in_features().max(1)).max(1);
        let one = |(c, dst): (usize, &mut [f32])| {
            let first = c * rows;
            linear.rows(x, input, batch, first..first + dst.len() / batch, dst, isa)
        };
        if parallel {
            out.par_chunks_mut(rows * batch)
                .enumerate()
                .try_for_each(one)
        } else {
            out.chunks_mut(rows * batch).enumerate().try_for_each(one)
        }
    };
    if uses <= INLINE_WEIGHTS {
        tasks.iter_mut().try_for_each(|t| run(t, false))
    } else {
        tasks.par_iter_mut().try_for_each(|t| run(t, true))
    }
}
