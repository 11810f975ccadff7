//! The server-wide budget of memory for update payloads being received: each upload reserves
//! its announced size before its bytes are read and keeps it until the run has decided on it, so
//! however many authenticated clients upload at once, the payloads in memory stay within
//! `[server] upload_memory_mb`; an upload that finds the budget spent waits for room.

use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

const MIB: u64 = 1 << 20;

/// The room left for payloads in memory, in MiB.
#[derive(Clone)]
pub(super) struct UploadBudget {
    room: Arc<Semaphore>,
    total_mib: u32,
}

/// Room reserved for one payload; given back when dropped.
pub(super) struct Reservation {
    _permit: OwnedSemaphorePermit,
}

impl UploadBudget {
    /// A budget of `mib` MiB (at least one).
    pub(super) fn new(mib: u64) -> Self {
        let total_mib = u32::try_from(mib.max(1)).unwrap_or(u32::MAX);
        Self {
            room: Arc::new(Semaphore::new(total_mib as usize)),
            total_mib,
        }
    }

    /// Reserves room for a payload of `bytes`, waiting while other uploads hold the budget; `None`
    /// for one larger than the whole budget (the configuration keeps the largest legal upload
    /// within it).
    pub(super) async fn reserve(&self, bytes: u64) -> Option<Reservation> {
        let mib = u32::try_from(bytes.div_ceil(MIB).max(1)).ok()?;
        if mib > self.total_mib {
            return None;
        }
        let permit = self.room.clone().acquire_many_owned(mib).await.ok()?;
        Some(Reservation { _permit: permit })
    }

    /// MiB free now.
    #[cfg(test)]
    fn free_mib(&self) -> usize {
        self.room.available_permits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn uploads_beyond_the_budget_wait_for_room_and_one_larger_than_it_is_refused() {
        let budget = UploadBudget::new(10);
        let first = budget.reserve(6 * MIB).await.expect("room");
        let second = budget.reserve(3 * MIB + 1).await.expect("room");
        assert_eq!(budget.free_mib(), 0, "6 MiB and 4 MiB (rounded up) of 10");
        // A third waits while the first two are held...
        let waiting = tokio::time::timeout(Duration::from_millis(100), budget.reserve(1)).await;
        assert!(waiting.is_err(), "no room: it waits");
        // ...and goes once one is given back.
        drop(second);
        let third = tokio::time::timeout(Duration::from_secs(5), budget.reserve(MIB))
            .await
            .expect("room again")
            .expect("within the budget");
        assert!(
            budget.reserve(11 * MIB).await.is_none(),
            "larger than the whole budget"
        );
        drop((first, third));
        assert_eq!(budget.free_mib(), 10);
    }
}
