//! One split-learning task on the device: the head runs each minibatch, the activations go to the
//! server on the task's split stream, the gradients come back in order, and the head steps. Up to
//! `pipeline` minibatches are in flight, so the device computes the next forward pass while the
//! server works on the last one. When all steps are done, the head update is encoded with the
//! server's codec like any federated update.

use crate::trainer::{EncodedUpdate, TaskSpec, Trainer};
use anyhow::{Context, Result, bail};
use serde::Serialize;
use shoal_compression::CodecSpec;
use shoal_net::protocol::StreamHeader;
use shoal_net::stream::{MessageReader, write_message};
use shoal_split::{BatchOrder, HeadRunner};
use std::sync::Arc;
use std::time::Instant;

/// Throughput of one split task.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct SplitFigures {
    /// Samples trained.
    pub samples: u64,
    /// Seconds from the first forward pass to the last gradient.
    pub seconds: f64,
    /// Forward-message bytes sent.
    pub forward_bytes: u64,
    /// Gradient bytes received.
    pub gradient_bytes: u64,
}

/// Trains `spec` from the head weights `head` with the server's tail over `conn`.
pub async fn train(
    conn: quinn::Connection,
    trainer: Arc<Trainer>,
    spec: TaskSpec,
    head: Arc<[f32]>,
    pipeline: usize,
    max_frame: u32,
) -> Result<(EncodedUpdate, SplitFigures)> {
    let started = Instant::now();
    let role = trainer.split().context("this run is not split")?;
    let seed = spec.seed;
    let batch_size = trainer.batch_size();
    let mut runner = role
        .config
        .head_runner(role.model.clone(), head.to_vec(), spec.lr, batch_size);
    let data = trainer.data();
    let mut order = BatchOrder::new(data.indices.clone(), batch_size, seed);
    let (mut send, recv) = conn.open_bi().await.context("opening the split stream")?;
    write_message(&mut send, &StreamHeader::Split { task: spec.task }).await?;
    let mut reader = MessageReader::new(recv, max_frame);
    let mut figures = SplitFigures::default();
    let mut in_flight = 0usize;
    let pipeline = pipeline.max(1);
    let mut next_gradient = async |runner: &mut HeadRunner, figures: &mut SplitFigures| -> Result<()> {
        let Some(gradient) = reader
            .next_message::<Vec<u8>>()
            .await
            .context("reading a gradient")?
        else {
            bail!("the server ended the split stream early");
        };
        figures.gradient_bytes += gradient.len() as u64;
        tokio::task::block_in_place(|| runner.backward(&gradient)).context("the head's backward pass")?;
        Ok(())
    };
    for _ in 0..spec.local_steps {
        if in_flight == pipeline {
            next_gradient(&mut runner, &mut figures).await?;
            in_flight -= 1;
        }
        let batch = order.next_batch().context("this device holds no samples")?;
        let (x, y) = data.dataset.batch(batch);
        figures.samples += y.len() as u64;
        let message =
            tokio::task::block_in_place(|| runner.forward(x, &y)).context("the head's forward pass")?;
        figures.forward_bytes += message.len() as u64;
        write_message(&mut send, &message).await?;
        in_flight += 1;
    }
    send.finish().context("finishing the split stream")?;
    while in_flight > 0 {
        next_gradient(&mut runner, &mut figures).await?;
        in_flight -= 1;
    }
    figures.seconds = started.elapsed().as_secs_f64();
    let codec: CodecSpec = spec
        .codec
        .parse()
        .with_context(|| format!("the server's codec `{}`", spec.codec))?;
    let payload = runner.encode_update(&codec, seed)?;
    let update = EncodedUpdate {
        meta: trainer.meta(&spec, spec.local_steps, 0.0, started),
        parts: vec![payload],
        next_state: Default::default(),
    };
    Ok((update, figures))
}
