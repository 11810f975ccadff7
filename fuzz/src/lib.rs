//! shoal-fuzz: feeds each decoder of peer input ([`targets`]) generated and mutated inputs
//! ([`mutate`]) and counts what it accepted, refused, and — the defect this looks for — panicked
//! on. `shoal-fuzz` runs millions per decoder; the test suite runs a few thousand.
//! [`config_values`] does the same for configuration files: every numeric field set to values
//! meant to break it, for fl-server's and fl-sim's property tests.

pub mod config_values;
pub mod mutate;
pub mod targets;

use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::Serialize;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, Ordering};
use targets::Target;

/// What one decoder did with its inputs.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Tally {
    /// The decoder.
    pub target: String,
    /// Inputs fed.
    pub inputs: u64,
    /// Inputs it decoded.
    pub accepted: u64,
    /// Inputs it refused with an error.
    pub refused: u64,
    /// Inputs it panicked on.
    pub panics: u64,
    /// The first inputs it panicked on (at most [`KEPT_PANICS`]).
    #[serde(skip)]
    pub panicked_on: Vec<Vec<u8>>,
}

/// Inputs kept of those a decoder panicked on.
pub const KEPT_PANICS: usize = 16;

impl Tally {
    fn add(&mut self, other: Tally) {
        self.inputs += other.inputs;
        self.accepted += other.accepted;
        self.refused += other.refused;
        self.panics += other.panics;
        let room = KEPT_PANICS.saturating_sub(self.panicked_on.len());
        self.panicked_on.extend(other.panicked_on.into_iter().take(room));
    }
}

/// Feeds `target` `inputs` inputs on `threads` threads, each stream of inputs seeded from `seed`;
/// `done` counts the inputs fed so far (for progress). Panics are caught and counted; silence
/// the panic hook first to keep their messages off the terminal.
pub fn fuzz(target: &Target, inputs: u64, seed: u64, threads: usize, done: &AtomicU64) -> Tally {
    let threads = threads.max(1) as u64;
    let mut total = Tally {
        target: target.name.to_string(),
        ..Tally::default()
    };
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let share = inputs / threads + u64::from(t < inputs % threads);
                let stream = seed ^ (t + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                scope.spawn(move || fuzz_one_thread(target, share, stream, done))
            })
            .collect();
        for worker in workers {
            if let Ok(tally) = worker.join() {
                total.add(tally);
            }
        }
    });
    total
}

fn fuzz_one_thread(target: &Target, inputs: u64, seed: u64, done: &AtomicU64) -> Tally {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut tally = Tally::default();
    let mut input = Vec::new();
    for i in 0..inputs {
        mutate::next_input(&mut rng, &target.seeds, target.sealed, &mut input);
        match catch_unwind(AssertUnwindSafe(|| (target.decode)(&input))) {
            Ok(true) => tally.accepted += 1,
            Ok(false) => tally.refused += 1,
            Err(_) => {
                tally.panics += 1;
                if tally.panicked_on.len() < KEPT_PANICS {
                    tally.panicked_on.push(input.clone());
                }
            }
        }
        tally.inputs += 1;
        if i % 1024 == 1023 {
            done.fetch_add(1024, Ordering::Relaxed);
        }
    }
    done.fetch_add(inputs % 1024, Ordering::Relaxed);
    tally
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_decoder_refuses_mutated_input_without_a_panic_and_accepts_its_seeds() {
        for name in targets::NAMES {
            let target = targets::target(name).expect("a target");
            assert!(target.seeds.len() >= 2, "{name} has seeds");
            for seed in &target.seeds {
                assert!((target.decode)(seed), "{name} accepts its valid encodings");
            }
            let done = AtomicU64::new(0);
            let tally = fuzz(&target, 20_000, 11, 2, &done);
            assert_eq!(tally.inputs, 20_000);
            assert_eq!(done.load(Ordering::Relaxed), 20_000);
            assert_eq!(
                tally.panics,
                0,
                "{name} panicked on {:?}",
                tally.panicked_on.first()
            );
            assert!(
                tally.refused > 1000,
                "{name}: most mutations are refused: {tally:?}"
            );
        }
    }

    #[test]
    fn a_decoder_that_panics_is_caught_and_its_inputs_kept() {
        let target = Target {
            name: "panics on a leading zero",
            seeds: vec![vec![0, 1, 2], vec![5, 6, 7]],
            sealed: false,
            decode: Box::new(|bytes| {
                assert!(bytes.first() != Some(&0), "a leading zero");
                true
            }),
        };
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let tally = fuzz(&target, 2_000, 5, 1, &AtomicU64::new(0));
        std::panic::set_hook(hook);
        assert!(tally.panics > 0);
        assert!(tally.panicked_on.iter().all(|i| i.first() == Some(&0)));
        assert_eq!(tally.panicked_on.len(), KEPT_PANICS.min(tally.panics as usize));
    }
}
