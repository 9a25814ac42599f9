#![no_main]
//! cargo-fuzz target; the check is in ../checks/http_request.rs, shared with the
//! stable corpus replay.

#[path = "../checks/http_request.rs"]
mod check;

libfuzzer_sys::fuzz_target!(|data: &[u8]| check::check(data));
