//! Two client job engines talk to each other through the server (issue #5): `site-1.<job>` and
//! `site-2.<job>` are each their own TCP endpoint connected only to an endpoint named `server`
//! that hosts no cell and only relays, as fedrun's server process and
//! NVFlare's server root cell do. Aux requests go both ways and are answered, small ones in one
//! frame and a large one as a relayed stream, all over 127.0.0.1 in this one test process.
//! Every wait has a deadline.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use fedrun_cell::Fqcn;
use fedrun_core::constants::fl_ctx_key;
use fedrun_core::{NdArray, ReturnCode, Shareable, Value};
use fedrun_engine::{aux_handler, AuxRequest, AuxTargets, ClientEngine, EngineHandle};
use fedrun_wire::{StreamSendConfig, TcpTransport, WireConfig};

/// Upper bound of every wait (and the aux requests' timeout).
const DEADLINE: Duration = Duration::from_secs(20);
/// The chunk size of the client jobs' streams.
const CHUNK: usize = 256 * 1024;
/// The largest frame the relay reads: a 1 MiB message can only cross it as a stream.
const RELAY_MAX_FRAME: usize = CHUNK + 64 * 1024;
const SITES: [&str; 2] = ["site-1", "site-2"];
/// float32 values of the large request: 3 MiB and a bit.
const WEIGHTS: usize = 3 * 256 * 1024 + 5;

fn init_log() {
    let _ = env_logger::builder().is_test(true).try_init();
}

fn job_config() -> WireConfig {
    WireConfig {
        reconnect_initial: Duration::from_millis(20),
        reconnect_max: Duration::from_millis(200),
        stream_send: StreamSendConfig {
            chunk_size: CHUNK,
            ..StreamSendConfig::default()
        },
        ..WireConfig::default()
    }
}

/// The server endpoint: relays, hosts no cell, and cannot even read a frame of 1 MiB.
async fn relay() -> (TcpTransport, SocketAddr) {
    let config = WireConfig {
        max_frame_size: RELAY_MAX_FRAME,
        ..WireConfig::default()
    };
    let relay = TcpTransport::new(Fqcn::SERVER, config);
    let addr = relay.add_listener("tcp://127.0.0.1:0").await.unwrap();
    (relay, addr)
}

/// The client job engine of `site` on its own endpoint `<site>.<job>`, connected to the relay,
/// answering aux topic `echo`.
async fn client_job(site: &str, job: &str, relay: SocketAddr) -> (TcpTransport, EngineHandle) {
    let me = Fqcn::job_cell(site, job).unwrap();
    let net = TcpTransport::new(me, job_config());
    net.add_connector(&format!("tcp://{relay}")).unwrap();
    assert!(net.wait_for_peer(&Fqcn::SERVER, DEADLINE).await);
    let engine = ClientEngine::builder(site, job)
        .job_clients(&SITES)
        .start_on(net.clone())
        .await
        .unwrap();
    engine
        .register_aux_message_handler("echo", echo())
        .await
        .unwrap();
    (net, engine)
}

/// Answers who answered, who asked (the peer context's identity), and the request's `n` and
/// `blob`.
fn echo() -> fedrun_engine::AuxHandler {
    aux_handler(|req: AuxRequest| async move {
        let mut reply = Shareable::new();
        reply.insert("who", req.ctx.identity_name());
        let peer = req
            .ctx
            .peer_context()
            .and_then(|p| p.get(fl_ctx_key::IDENTITY_NAME))
            .cloned()
            .unwrap_or(Value::Nil);
        reply.insert("peer", peer);
        for key in ["n", "blob"] {
            if let Some(v) = req.request.get(key) {
                reply.insert(key, v.clone());
            }
        }
        Ok::<_, String>(reply)
    })
}

fn str_of<'a>(s: &'a Shareable, key: &str) -> Option<&'a str> {
    s.get(key).and_then(Value::as_str)
}

/// `from` asks `to` on `echo` and checks the answer came from `to`, for `from`, with `request`.
async fn ask(from: &EngineHandle, to: &str, request: Shareable) {
    let replies = tokio::time::timeout(
        DEADLINE,
        from.send_aux_request(
            AuxTargets::Site(to.to_owned()),
            "echo",
            request.clone(),
            DEADLINE,
        ),
    )
    .await
    .expect("answered before the deadline")
    .unwrap();
    let reply = replies
        .get(to)
        .unwrap_or_else(|| panic!("no reply from {to}: {replies:?}"));
    assert_eq!(
        reply.return_code(),
        ReturnCode::OK,
        "{} -> {to}: {reply:?}",
        from.site()
    );
    assert_eq!(str_of(reply, "who"), Some(to));
    assert_eq!(str_of(reply, "peer"), Some(from.site()));
    for key in ["n", "blob"] {
        assert!(
            reply.get(key) == request.get(key),
            "{} -> {to}: {key} not echoed intact",
            from.site()
        );
    }
}

#[actix::test]
async fn client_jobs_exchange_aux_requests_and_replies_through_a_relaying_server() {
    init_log();
    let job = format!("relay-{}", uuid::Uuid::new_v4());
    let (relay, addr) = relay().await;
    let (net1, site1) = client_job("site-1", &job, addr).await;
    let (net2, site2) = client_job("site-2", &job, addr).await;
    for site in SITES {
        let peer = Fqcn::job_cell(site, &job).unwrap();
        assert!(relay.wait_for_peer(&peer, DEADLINE).await);
    }
    // no direct link between the client jobs: whatever they exchange crosses the server
    assert_eq!(net1.peers(), vec![Fqcn::SERVER]);
    assert_eq!(net2.peers(), vec![Fqcn::SERVER]);

    let mut small = Shareable::new();
    small.insert("n", 1);
    ask(&site1, "site-2", small.clone()).await;
    small.insert("n", 2);
    ask(&site2, "site-1", small).await;

    // a 3 MiB float32 array: streamed in 256 KiB chunks (the relay cannot read a bigger frame), acknowledged
    // end to end through the relay, and so is the streamed reply
    let weights: Vec<f32> = (0..WEIGHTS).map(|i| i as f32 * 0.5).collect();
    let blob = NdArray::from_f32(&[WEIGHTS], &weights).unwrap();
    let mut big = Shareable::new();
    big.insert("n", 3);
    big.insert("blob", blob);
    ask(&site1, "site-2", big.clone()).await;
    big.insert("n", 4);
    ask(&site2, "site-1", big).await;

    // the relay kept both connections through it all (an oversized frame would have closed one)
    assert_eq!(
        relay.peers(),
        vec![
            Fqcn::job_cell("site-1", &job).unwrap(),
            Fqcn::job_cell("site-2", &job).unwrap()
        ]
    );
    for engine in [&site1, &site2] {
        engine.stop().await;
    }
    net1.shutdown().await;
    net2.shutdown().await;
    relay.shutdown().await;
}
