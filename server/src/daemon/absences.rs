//! When a disconnected client counts as gone. Its grace runs from its first disconnection while it
//! holds a task: a client that drops and reconnects again and again holds that task one grace
//! period in all, not one per reconnection.

use shoal_core::{ClientId, TaskId};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The registered clients without a connection, and when each counts as gone.
pub(super) struct Absences {
    grace: Duration,
    /// Clients away now, and the instant they count as gone.
    away: HashMap<ClientId, Instant>,
    /// Each client's first disconnection while holding the task named (none: it held no task).
    since: HashMap<ClientId, (Option<TaskId>, Instant)>,
}

impl Absences {
    /// No one away yet; `grace` is how long a disconnected client keeps its task.
    pub(super) fn new(grace: Duration) -> Self {
        Self {
            grace,
            away: HashMap::new(),
            since: HashMap::new(),
        }
    }

    /// `client` lost its connection at `now` while holding `task`. Its grace runs from its first
    /// disconnection with that same task, or from now.
    pub(super) fn left(&mut self, client: ClientId, task: Option<TaskId>, now: Instant) {
        let since = match self.since.get(&client) {
            Some(&(held, at)) if held.is_some() && held == task => at,
            _ => now,
        };
        self.since.insert(client, (task, since));
        self.away.insert(client, since + self.grace);
    }

    /// `client` connected again (its first disconnection is remembered while it holds the task).
    pub(super) fn back(&mut self, client: ClientId) {
        self.away.remove(&client);
    }

    /// The earliest instant someone counts as gone.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.away.values().copied().min()
    }

    /// The clients whose grace is over at `now`, forgotten here.
    pub(super) fn gone(&mut self, now: Instant) -> Vec<ClientId> {
        let mut gone: Vec<ClientId> = self
            .away
            .iter()
            .filter(|(_, d)| **d <= now)
            .map(|(c, _)| *c)
            .collect();
        gone.sort_unstable();
        for client in &gone {
            self.away.remove(client);
            self.since.remove(client);
        }
        gone
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: Duration = Duration::from_secs(30);

    #[test]
    fn reconnecting_does_not_restart_the_grace_of_a_held_task() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut absences = Absences::new(GRACE);
        let (client, task) = (ClientId(3), Some(TaskId(7)));
        absences.left(client, task, at(0));
        // Back within the grace and gone again, four times over 80 s: one grace from the first.
        for s in [20, 40, 60, 80] {
            absences.back(client);
            assert_eq!(absences.next_deadline(), None);
            absences.left(client, task, at(s));
            assert_eq!(absences.next_deadline(), Some(at(30)));
        }
        assert_eq!(absences.gone(at(29)), Vec::<ClientId>::new());
        assert_eq!(absences.gone(at(80)), vec![client]);
        assert_eq!(absences.next_deadline(), None);
    }

    #[test]
    fn a_new_task_or_no_task_gets_a_grace_of_its_own() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut absences = Absences::new(GRACE);
        let client = ClientId(1);
        absences.left(client, Some(TaskId(1)), at(0));
        absences.back(client);
        // It delivered task 1 and took task 2: a disconnection now starts a new grace.
        absences.left(client, Some(TaskId(2)), at(100));
        assert_eq!(absences.next_deadline(), Some(at(130)));
        absences.back(client);
        // Without a task, each disconnection has its own grace (there is nothing to hold).
        absences.left(client, None, at(200));
        absences.back(client);
        absences.left(client, None, at(220));
        assert_eq!(absences.next_deadline(), Some(at(250)));
        // Another client's clock is its own.
        absences.left(ClientId(2), Some(TaskId(9)), at(210));
        assert_eq!(absences.gone(at(240)), vec![ClientId(2)]);
        assert_eq!(absences.gone(at(250)), vec![client]);
    }
}
