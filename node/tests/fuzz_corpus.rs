//! Replays fuzz/corpus/http_request and fuzz/corpus/topology (seeds and
//! crash reproducers of the cargo-fuzz targets of the same names) through the
//! same checks on stable Rust.

#[path = "../../fuzz/checks/http_request.rs"]
mod http_request;
#[path = "../../fuzz/checks/replay.rs"]
mod replay;
#[path = "../../fuzz/checks/topology.rs"]
mod topology;

#[test]
fn the_http_request_corpus_passes_the_fuzz_check() {
    let n = replay::replay("http_request", http_request::check);
    assert!(n >= 10, "only {n} corpus files");
}

#[test]
fn the_http_request_seeds_reach_the_node_and_its_errors() {
    let files = replay::read_corpus(&replay::corpus_dir("http_request")).expect("the corpus");
    let mut statuses = std::collections::BTreeSet::new();
    let _turn = http_request::ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    for (_, bytes) in &files {
        if let Some(req) = http_request::parse_request(bytes) {
            statuses.insert(http_request::send(&req).status);
        }
    }
    for want in [200, 400, 403, 404, 405, 413] {
        assert!(
            statuses.contains(&want),
            "no seed answered {want}: {statuses:?}"
        );
    }
}

#[test]
fn the_http_check_refuses_an_error_without_the_contract_shape() {
    let req = http_request::parse_request(b"GET /v1/kv/x HTTP/1.1\r\n\r\n").expect("a request");
    let answer = json_answer;
    let good = answer(404, r#"{"error":"not_found","message":"no such key"}"#);
    assert_eq!(http_request::violation(&req, &good), None);
    for bad in [
        answer(500, r#"{"error":"internal","message":"boom"}"#),
        answer(404, r#"{"error":"bad_request","message":"wrong code"}"#),
        answer(400, r#"{"error":"bad_request"}"#),
        answer(400, "bad request"),
    ] {
        assert!(
            http_request::violation(&req, &bad).is_some(),
            "{}",
            bad.status
        );
    }
}

#[test]
fn the_topology_corpus_passes_the_fuzz_check() {
    let n = replay::replay("topology", topology::check);
    assert!(n >= 4, "only {n} corpus files");
}

#[test]
fn some_topology_seeds_are_installed() {
    let files = replay::read_corpus(&replay::corpus_dir("topology")).expect("the corpus");
    let accepted = files
        .iter()
        .filter(|(_, b)| kv_core::Topology::from_json(b).is_ok_and(|t| t.epoch > 0))
        .count();
    assert!(
        accepted >= 2,
        "only {accepted} seeds are installable topologies"
    );
}

#[test]
fn a_corpus_replay_fails_when_its_check_fails() {
    replay::assert_the_replay_can_fail();
}

/// An authority-form target (`GET ng`, `GET host:80`) once made warp's path
/// filter panic before the node's router ran (the connection dropped
/// unanswered); kv_net's accept loop answers it with a 400 now, and the
/// fuzz check sends it like any other request.
#[test]
fn authority_form_targets_are_answered_with_a_json_400() {
    let raw = b"GET ng HTTP/1.1\r\nAuthorization: Bearer nope\r\n\r\n";
    let req = http_request::parse_request(raw).expect("a request the check sends");
    let _turn = http_request::ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let answer = http_request::send(&req);
    assert_eq!(answer.status, 400);
    assert_eq!(http_request::violation(&req, &answer), None);
}

#[test]
fn the_http_check_takes_the_peer_ports_epoch_refusals_and_only_there() {
    let answer = |body: &str| json_answer(409, body);
    // fuzz/artifacts of a CI run: the shared node had taken epoch 5 from an
    // earlier input, and an apply from epoch 0 was (rightly) fenced.
    let apply =
        http_request::parse_request(b"POST /internal/v1/apply HTTP/1.1\r\nX-Kv-Epoch: 0\r\n\r\n")
            .expect("a request");
    let stale = answer(
        r#"{"error":"stale_epoch","message":"node 0 holds topology epoch 5, newer than the writer's 0"}"#,
    );
    assert_eq!(http_request::violation(&apply, &stale), None);
    let behind = answer(r#"{"error":"behind","message":"fetching the new topology"}"#);
    assert_eq!(http_request::violation(&apply, &behind), None);
    let other = answer(r#"{"error":"whatever","message":"m"}"#);
    assert!(http_request::violation(&apply, &other).is_some());
    let client = http_request::parse_request(b"PUT /v1/kv/x HTTP/1.1\r\n\r\n").expect("a request");
    assert!(
        http_request::violation(&client, &stale).is_some(),
        "the client port's 409 is conflict"
    );
}

/// An answer with a JSON content type, as the node gives its errors.
fn json_answer(status: u16, body: &str) -> http_request::Answer {
    http_request::Answer {
        status,
        headers: [(
            warp::http::header::CONTENT_TYPE,
            warp::http::HeaderValue::from_static("application/json"),
        )]
        .into_iter()
        .collect(),
        body: body.as_bytes().to_vec(),
    }
}
