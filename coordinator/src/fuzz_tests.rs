//! The coordinator's decoders of what it reads back from its database, under
//! [`forge_protocol::fuzz`]: the state snapshot (decoded, then driven past every timeout, as a
//! restart would) and the round records.

use forge_protocol::codec::{self, Channel};
use forge_protocol::fuzz;
use forge_protocol::session::RoundRecord;
use forge_protocol::{MemberId, RoundId};

use crate::core::{Coordinator, Millis};
use crate::sim::{Driver, config, honest_digest};

#[test]
fn fuzz_the_state_snapshot() {
    let mut cfg = config(2);
    cfg.checkpoint_every_rounds = 1;
    let mut driver = Driver::new(cfg);
    driver.join(1, 24 << 30);
    driver.join(2, 24 << 30);
    driver.join(3, 8 << 30);
    driver.report(1, RoundId(1), honest_digest(RoundId(1)));
    driver.report(2, RoundId(1), honest_digest(RoundId(1)));
    let seeds = vec![
        Driver::new(config(1)).coordinator.to_snapshot().unwrap(),
        driver.coordinator.to_snapshot().unwrap(),
    ];
    fuzz::run_frames("coordinator snapshot", Channel::Snapshot, &seeds, |bytes| {
        if let Ok(mut restored) = Coordinator::from_snapshot(bytes, Millis(0)) {
            // What a restarted coordinator does next: time passes, members time out, rounds
            // close, the status is read.
            for now in [1_000, 10_000, 100_000, 10_000_000] {
                let _ = restored.tick(Millis(now));
            }
            let _ = restored.members().count();
        }
    });
}

#[test]
fn fuzz_round_records() {
    let record = RoundRecord {
        round: RoundId(12),
        committed: true,
        included: vec![MemberId(1), MemberId(2)],
        excluded: vec![MemberId(3)],
        closed_at_unix_ms: 1_780_000_000_000,
    };
    let seeds = vec![codec::encode(Channel::Snapshot, &record).unwrap()];
    fuzz::run_frames("round records", Channel::Snapshot, &seeds, |bytes| {
        let _ = codec::decode::<RoundRecord>(Channel::Snapshot, bytes);
    });
}
