#![no_main]
//! cargo-fuzz target; the check is in ../checks/topology.rs, shared with the
//! stable corpus replay.

#[path = "../checks/topology.rs"]
mod check;

libfuzzer_sys::fuzz_target!(|data: &[u8]| check::check(data));
