//! Misbehaviour on purpose, for the hostile-member tests (`tests/diloco.rs`): a node started
//! with `FORGE_HOSTILE` set to one of the modes below attacks the run it joins. Compiled into
//! debug builds only: a release binary ignores the variable and contains none of this.

/// What a hostile node does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// As a chunk owner, sends every member its reduced range times 1e30 (the same bits to
    /// all, so they would agree on it): `poison-results`.
    PoisonResults,
    /// Claims 100 times the tokens it trained on, its contribution scaled alike so that its
    /// norm per unit of weight looks ordinary: `inflate-weight`.
    InflateWeight,
    /// Reports every round failed, blaming another participant's contribution (a false
    /// accusation): `accuse-honest`.
    AccuseHonest,
}

/// The scale a poisoned owner multiplies its reduced range by.
pub(crate) const POISON: f32 = 1e30;
/// How many times its real weight an inflating member claims.
pub(crate) const INFLATE: f32 = 100.0;

/// This node's mode, if it was started hostile (debug builds only).
pub(crate) fn mode() -> Option<Mode> {
    #[cfg(debug_assertions)]
    {
        static MODE: std::sync::OnceLock<Option<Mode>> = std::sync::OnceLock::new();
        *MODE.get_or_init(|| {
            let mode = match std::env::var("FORGE_HOSTILE").ok()?.as_str() {
                "poison-results" => Mode::PoisonResults,
                "inflate-weight" => Mode::InflateWeight,
                "accuse-honest" => Mode::AccuseHonest,
                other => {
                    tracing::error!("FORGE_HOSTILE={other:?} names no mode; behaving");
                    return None;
                }
            };
            tracing::warn!("hostile test node: {mode:?}");
            Some(mode)
        })
    }
    #[cfg(not(debug_assertions))]
    {
        None
    }
}

/// A poisoning owner's relayed chunk (sparse codecs, `p2p::relay`) into `out`: each member's
/// part decoded to its `n` values and encoded again by the codec, which multiplies what it
/// encodes by [`POISON`] in this mode (see `join::sync`).
pub(crate) fn poison_relayed(
    codec: &mut dyn crate::p2p::ChunkCodec,
    parts: &[&[u8]],
    n: usize,
    out: &mut Vec<u8>,
) -> Result<(), String> {
    let mut values = vec![0.0f32; n];
    let mut poisoned = Vec::with_capacity(parts.len());
    for part in parts {
        codec
            .decode_into(part, &mut values)
            .map_err(|e| e.to_string())?;
        let mut bytes = Vec::new();
        codec
            .encode_result(0, &values, f64::INFINITY, &mut bytes)
            .map_err(|e| e.to_string())?;
        poisoned.push(bytes);
    }
    let parts: Vec<&[u8]> = poisoned.iter().map(Vec::as_slice).collect();
    crate::p2p::relay::pack(&parts, out)
}
