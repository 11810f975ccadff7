//! The seed of one task: every random choice a device makes for a task (minibatch order, random
//! codec stages) draws from it, in fl-sim and on a real device alike. The Coordinator derives it
//! and sends it with the task ([`crate::Command::Train`]), so no driver derives one itself.
//!
//! It depends on the client and on how many tasks that client was given before, not on the task
//! id: task ids follow the order in which updates happen to arrive, which differs between a
//! virtual clock and a real network, while a client's own sequence of tasks does not (under
//! synchronous rounds with full participation, fl-sim and fl-server give each client the same
//! tasks, and so the same seeds).

use shoal_core::ClientId;

/// SplitMix64's finaliser of `seed` mixed with `value`: neighbouring values get unrelated seeds.
fn mix(seed: u64, value: u64) -> u64 {
    let mut z = seed ^ value.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The seed of the `ordinal`-th task (from 0) given to `client` in a run seeded with `seed`.
pub fn task_seed(seed: u64, client: ClientId, ordinal: u64) -> u64 {
    mix(mix(seed, client.0), ordinal)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neighbouring_clients_tasks_and_runs_get_unrelated_seeds() {
        let a = task_seed(0, ClientId(1), 0);
        let b = task_seed(0, ClientId(2), 0);
        let c = task_seed(1, ClientId(1), 0);
        let d = task_seed(0, ClientId(1), 1);
        // Client 1's second task and client 2's first are not the same seed.
        let e = task_seed(0, ClientId(0), 1);
        for (x, y) in [(a, b), (a, c), (a, d), (b, e), (d, e)] {
            assert_ne!(x, y);
            // Unrelated: about half of the 64 bits differ, not one or two.
            assert!((x ^ y).count_ones() > 16, "{x:x} vs {y:x}");
        }
        assert_eq!(task_seed(7, ClientId(9), 3), task_seed(7, ClientId(9), 3));
    }
}
