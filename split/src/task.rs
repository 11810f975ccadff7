//! A device's minibatch order and one split-training task run in process: the head and a tail
//! side by side, every forward and gradient message through the real cut codec, so its loss and
//! its bytes are what a deployment would see. The simulator computes tasks this way and charges
//! the recorded bytes on its virtual clock.

use crate::error::SplitError;
use crate::head::HeadRunner;
use crate::server::TailSession;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use shoal_model::data::Dataset;
use std::collections::VecDeque;

/// Minibatches drawn without replacement in a freshly shuffled order each epoch (the last batch of
/// an epoch may be smaller), from a seeded RNG — the order [`shoal_model::ModelOracle`] and
/// [`shoal_model::train::train_epoch`] use, so split and unsplit training see the same batches.
#[derive(Debug)]
pub struct BatchOrder {
    indices: Vec<usize>,
    order: Vec<usize>,
    cursor: usize,
    batch_size: usize,
    rng: StdRng,
}

impl BatchOrder {
    /// Batches of `batch_size` over `indices`, shuffled from `seed`.
    pub fn new(indices: Vec<usize>, batch_size: usize, seed: u64) -> Self {
        Self {
            indices,
            order: Vec::new(),
            cursor: 0,
            batch_size: batch_size.max(1),
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// The next minibatch's sample indices; `None` when there are no samples at all.
    pub fn next_batch(&mut self) -> Option<&[usize]> {
        if self.indices.is_empty() {
            return None;
        }
        if self.cursor == 0 || self.cursor >= self.order.len() {
            self.order.clone_from(&self.indices);
            self.order.shuffle(&mut self.rng);
            self.cursor = 0;
        }
        let start = self.cursor;
        self.cursor = (start + self.batch_size).min(self.order.len());
        Some(&self.order[start..self.cursor])
    }
}

/// What one task sent and learned.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TaskTrace {
    /// Bytes of each step's forward message (activations and labels).
    pub up_bytes: Vec<u64>,
    /// Bytes of each step's gradient message.
    pub down_bytes: Vec<u64>,
    /// Samples trained.
    pub samples: u64,
    /// Mean minibatch loss, weighted by batch size.
    pub mean_loss: f32,
    /// Fraction of training samples the tail classified correctly as they were trained.
    pub train_accuracy: f32,
}

/// Runs `steps` minibatches of split training: the head keeps up to `pipeline` batches in flight,
/// the tail serves them in order, and each gradient goes back through the head.
pub fn run_task(
    head: &mut HeadRunner,
    tail: &mut TailSession,
    data: &Dataset,
    order: &mut BatchOrder,
    steps: u32,
    pipeline: usize,
) -> Result<TaskTrace, SplitError> {
    let mut trace = TaskTrace::default();
    let mut waiting: VecDeque<Vec<u8>> = VecDeque::new();
    let (mut sent, mut loss_sum, mut correct) = (0u32, 0.0f64, 0usize);
    while sent < steps || !waiting.is_empty() {
        while sent < steps && waiting.len() < pipeline.max(1) {
            let Some(batch) = order.next_batch() else {
                return Err(SplitError::Config("the device holds no samples".into()));
            };
            let (x, y) = data.batch(batch);
            let message = head.forward(x, &y)?;
            trace.up_bytes.push(message.len() as u64);
            waiting.push_back(message);
            sent += 1;
        }
        let Some(message) = waiting.pop_front() else {
            break;
        };
        let served = tail.serve(&message)?;
        trace.down_bytes.push(served.gradient.len() as u64);
        head.backward(&served.gradient)?;
        loss_sum += f64::from(served.loss.mean_loss) * served.batch as f64;
        correct += served.loss.correct;
        trace.samples += served.batch as u64;
    }
    let n = trace.samples.max(1) as f64;
    trace.mean_loss = (loss_sum / n) as f32;
    trace.train_accuracy = (correct as f64 / n) as f32;
    Ok(trace)
}
