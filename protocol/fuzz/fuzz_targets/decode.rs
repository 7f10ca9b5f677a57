//! `cargo fuzz run decode` (needs cargo-fuzz; RUSTC_BOOTSTRAP=1 on a stable toolchain).
#![no_main]

use hearth_protocol::frame::FrameReader;
use hearth_protocol::{ClientMsg, Hello, Open, ServerMsg};
use libfuzzer_sys::fuzz_target;

fn drain<T: serde::de::DeserializeOwned>(rt: &tokio::runtime::Runtime, data: &[u8]) {
    rt.block_on(async {
        let mut r = FrameReader::new(data);
        while let Ok(Some(_)) = r.read::<T>().await {}
    });
}

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    drain::<ClientMsg>(&rt, data);
    drain::<ServerMsg>(&rt, data);
    drain::<Hello>(&rt, data);
    drain::<Open>(&rt, data);
    let _ = hearth_protocol::handshake::parse_preamble(data);
});
