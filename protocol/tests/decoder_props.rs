//! Property tests over the frame reader and message decoders: arbitrary bytes never panic
//! or over-allocate, and every well-formed message round-trips. (A cargo-fuzz target over
//! the same entry points lives in `protocol/fuzz`.)

use hearth_protocol::exec::{ExecRequest, StdioMode, WinSize};
use hearth_protocol::frame::{encode, FrameReader};
use hearth_protocol::{ClientMsg, Hello, Open, Request, ServerMsg, StreamTarget};
use proptest::prelude::*;

fn decode_all<T: serde::de::DeserializeOwned>(bytes: &[u8]) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut r = FrameReader::new(bytes);
        // Stops at the first error or at EOF; must never panic.
        while let Ok(Some(_)) = r.read::<T>().await {}
    });
}

fn arb_request() -> impl Strategy<Value = Request> {
    prop_oneof![
        Just(Request::Ping),
        Just(Request::Info),
        (
            proptest::collection::vec(".{0,12}", 0..4),
            any::<Option<u32>>(),
            any::<bool>(),
            any::<Option<(u16, u16)>>()
        )
            .prop_map(|(argv, uid, detached, pty)| Request::Exec(ExecRequest {
                argv,
                uid,
                detached,
                pty: pty.map(|(rows, cols)| WinSize { rows, cols }),
                stdio: StdioMode::Stream,
                ..Default::default()
            })),
        (any::<u64>(), proptest::collection::vec(any::<u8>(), 0..64))
            .prop_map(|(exec_id, data)| Request::ExecInput { exec_id, data }),
        (".{0,20}", any::<bool>()).prop_map(|(path, follow)| Request::Stat { path, follow }),
    ]
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        decode_all::<ClientMsg>(&bytes);
        decode_all::<ServerMsg>(&bytes);
        decode_all::<Hello>(&bytes);
        decode_all::<Open>(&bytes);
    }

    #[test]
    fn framed_garbage_never_panics(body in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut bytes = (body.len() as u32).to_le_bytes().to_vec();
        bytes.extend_from_slice(&body);
        decode_all::<ClientMsg>(&bytes);
        decode_all::<ServerMsg>(&bytes);
        decode_all::<Open>(&bytes);
    }

    #[test]
    fn requests_round_trip(id in any::<u64>(), req in arb_request()) {
        let msg = ClientMsg::Call { id, req };
        let bytes = encode(&msg).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let back: ClientMsg = rt.block_on(async {
            FrameReader::new(&bytes[..]).read().await.unwrap().unwrap()
        });
        prop_assert_eq!(back, msg);
    }

    #[test]
    fn stream_targets_round_trip(path in ".{0,40}", offset in any::<u64>(), len in any::<Option<u64>>()) {
        let open = Open::Stream(StreamTarget::FileRead { path, offset, len });
        let bytes = encode(&open).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let back: Open = rt.block_on(async {
            FrameReader::new(&bytes[..]).read().await.unwrap().unwrap()
        });
        prop_assert_eq!(back, open);
    }
}
