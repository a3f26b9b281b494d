//! Every byte a client sends, from the first handshake byte to the last
//! request, comes from the fuzzer; the server must neither panic nor hang.
//! Run: see docs/nbd.md ("Fuzzing").
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    cinderblock::export::fuzzing::serve_bytes(data);
});
