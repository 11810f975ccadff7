//! The seed of one task: every random choice a device makes for a task (minibatch order, random
//! codec stages) draws from it, in fl-sim and on a real device alike.

use shoal_core::TaskId;

/// The seed of `task` in a run seeded with `seed`: the run seed mixed with the task id through
/// the SplitMix64 finaliser, so neighbouring task ids get unrelated seeds.
pub fn task_seed(seed: u64, task: TaskId) -> u64 {
    let mut z = seed ^ task.0.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neighbouring_tasks_and_runs_get_unrelated_seeds() {
        let a = task_seed(0, TaskId(1));
        let b = task_seed(0, TaskId(2));
        let c = task_seed(1, TaskId(1));
        assert_ne!(a, b);
        assert_ne!(a, c);
        // Unrelated: about half of the 64 bits differ, not one or two.
        assert!((a ^ b).count_ones() > 16, "{a:x} vs {b:x}");
        assert!((a ^ c).count_ones() > 16, "{a:x} vs {c:x}");
        assert_eq!(task_seed(7, TaskId(9)), task_seed(7, TaskId(9)));
    }
}
