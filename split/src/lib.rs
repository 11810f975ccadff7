//! Split learning (ALGORITHMS.md §8) as sans-IO code that fl-sim, fl-server and fl-client drive.
//!
//! A model cut at a layer ([`shoal_model::split`]) runs its head on the device and its tail on the
//! server. For each minibatch the device sends the cut activations and the labels
//! ([`shoal_compression::cut`]: per-channel 8-bit levels with zstd by default), the server runs the
//! tail, steps its optimiser and returns the gradient at the cut, and the device back-propagates it
//! through the head.
//!
//! - [`config`]: the `[split]` table — cut, bottleneck, SplitFed variant, cut codecs, optimiser,
//!   pipeline depth.
//! - [`head`]: [`HeadRunner`], the device side: forward passes that may run ahead of the
//!   gradients (pipelining, with the head weights each batch used kept for its backward pass).
//! - [`server`]: [`TailSession`] (one server-side tail and its optimiser) and [`SplitServer`], the
//!   main server and fed server of SplitFed: V1 gives every task its own copy of the tail and
//!   averages them with the heads at the end of a round; V2 keeps one tail that serves clients in
//!   turn. Heads are federated-averaged with the aggregation monoid.
//! - [`task`]: the batch order of a device and one task run in process (head and tail side by
//!   side, every message through the real codec) — what the simulator computes.
//! - [`distill`]: BottleFit's two-stage training of a bottleneck injected into a trained model
//!   (distil the pair against the teacher's cut tensor, then fine-tune the server side with the
//!   device side frozen).
//! - [`inference`]: split inference: accuracy, bytes per sample and the compute of each side.

pub mod config;
pub mod distill;
mod error;
pub mod head;
pub mod inference;
pub mod server;
pub mod task;

pub use config::{SplitConfig, SplitVariant};
pub use error::SplitError;
pub use head::HeadRunner;
pub use server::{Served, SplitServer, TailSession};
pub use task::{BatchOrder, TaskTrace, run_task};
