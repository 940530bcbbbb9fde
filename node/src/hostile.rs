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
