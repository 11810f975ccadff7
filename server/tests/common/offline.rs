//! A fl-server run driven without a network, as the daemon drives it: clients join, and updates
//! are offered as a connection offers them (the payload written where uploads land, decoded,
//! hashed).

// Helpers unwrap: a failure here is the test failing.
#![allow(clippy::unwrap_used, dead_code)]

use shoal_aggregators::Event;
use shoal_core::{ClientId, ModelVersion, TaskId, UpdateMeta};
use shoal_server::run::{Offer, OfferError, Outgoing, ReceivedUpdate, Run};
use shoal_server::store::Store;

/// A task given out: to whom, its id, the version it trains from.
pub type Assignment = (ClientId, TaskId, ModelVersion);

/// The tasks among a run's outgoing messages.
pub fn assigned_tasks(out: Vec<Outgoing>) -> Vec<Assignment> {
    out.into_iter()
        .filter_map(|o| match o {
            Outgoing::Task {
                client,
                task,
                version,
                ..
            } => Some((client, task, version)),
            _ => None,
        })
        .collect()
}

/// Clients `device-0` … `device-{count-1}` join with 10 samples each; the tasks they were given.
pub fn join(server: &mut Run, count: usize) -> Vec<Assignment> {
    let mut tasks = Vec::new();
    for i in 0..count {
        let client = server.client_id(&format!("device-{i}")).unwrap();
        let out = server
            .handle(Event::Joined {
                client,
                num_samples: 10,
            })
            .unwrap();
        tasks.extend(assigned_tasks(out));
    }
    tasks
}

/// Offers an update of `value` everywhere for `assignment` (upload number `upload`), as a
/// connection would.
pub fn offer_update(
    server: &mut Run,
    (client, task, version): Assignment,
    value: f32,
    upload: u64,
) -> Result<Offer, OfferError> {
    let layout = server.layout();
    let values = vec![value; layout.len()];
    let payload =
        shoal_compression::encode(&shoal_compression::CodecSpec::identity(), &layout, &values, 0).unwrap();
    let incoming = Store::incoming_path(server.state_dir(), upload);
    shoal_server::files::write_atomic(&incoming, &[&payload]).unwrap();
    let part_bytes = vec![payload.len() as u64];
    let contribution = shoal_engine::decode_contribution(&payload, &part_bytes, &layout, 1, false).unwrap();
    let update = ReceivedUpdate {
        meta: UpdateMeta {
            client,
            task,
            base_version: version,
            num_samples: 10,
            local_steps: 1,
            loss: 0.5,
            duration_s: 0.1,
        },
        wire_bytes: payload.len() as u64,
        part_bytes,
        hash: shoal_server::files::content_hash(&[&payload]),
        contribution,
    };
    server.offer_update(update, &incoming)
}
