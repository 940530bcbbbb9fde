//! forge-coordinator binary (being built).

fn main() {}
