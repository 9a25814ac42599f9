#![no_main]
//! cargo-fuzz target; the check is in ../checks/kvcluster_spec.rs, shared with the
//! stable corpus replay.

#[path = "../checks/kvcluster_spec.rs"]
mod check;

libfuzzer_sys::fuzz_target!(|data: &[u8]| check::check(data));
