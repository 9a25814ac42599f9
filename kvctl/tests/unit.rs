//! Pure pieces: key encoding, endpoints, error parsing, argument parsing,
//! human output, and verify's comparison.

use std::collections::BTreeMap;

use clap::Parser;
use kv_core::{Consistency, NodeInfo, NodeState, PlacementSpec, Strategy, Topology};
use kvctl::cli::{Cli, Command, Level, Output, StrategyArg, ValueSource};
use kvctl::client::{self, ClientError, Owner, PlacementInfo, WriteAck, base_url, encode_key};
use kvctl::output::{self, NodeRow};
use kvctl::verify::{self, BucketDigest, DigestsResponse, NodeDigests, WireDigest};

#[test]
fn keys_are_percent_encoded_outside_unreserved_bytes() {
    assert_eq!(encode_key(b"abc-XYZ_0.9~"), "abc-XYZ_0.9~");
    assert_eq!(encode_key(b"a/b"), "a%2Fb");
    assert_eq!(encode_key(b"a b%c?d#e&f+g"), "a%20b%25c%3Fd%23e%26f%2Bg");
    assert_eq!(encode_key(b".."), "..");
    assert_eq!(encode_key("é".as_bytes()), "%C3%A9");
    assert_eq!(encode_key(&[0, 0xff, b'\n']), "%00%FF%0A");
    // Every byte survives a decode.
    let all: Vec<u8> = (0..=255u8).collect();
    let enc = encode_key(&all);
    assert!(
        enc.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~%".contains(&b))
    );
    let mut dec = Vec::new();
    let bytes = enc.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let h = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
            dec.push(u8::from_str_radix(h, 16).unwrap());
            i += 3;
        } else {
            dec.push(bytes[i]);
            i += 1;
        }
    }
    assert_eq!(dec, all);
}

#[test]
fn key_length_is_checked_before_sending() {
    assert!(client::check_key(b"").is_err());
    assert!(client::check_key(&[b'k'; 1024]).is_ok());
    assert!(client::check_key(b".").is_err());
    assert!(client::check_key(b"..").is_err());
    assert!(client::check_key(b"...").is_ok());
    let e = client::check_key(&[b'k'; 1025]).unwrap_err();
    assert!(e.to_string().contains("1025"), "{e}");
}

#[test]
fn endpoints_get_a_scheme_and_lose_trailing_slashes() {
    assert_eq!(base_url("127.0.0.1:5000").unwrap(), "http://127.0.0.1:5000");
    assert_eq!(base_url("http://h:1/").unwrap(), "http://h:1");
    assert_eq!(base_url(" http://h:1 ").unwrap(), "http://h:1");
    assert!(base_url("").is_err());
    assert_eq!(base_url("https://h:1/").unwrap(), "https://h:1");
    assert!(base_url("https://").is_err());
    assert!(base_url("ftp://h").is_err());
}

#[test]
fn server_errors_use_the_message_field() {
    let e = client::server_error(
        reqwest::StatusCode::FORBIDDEN,
        br#"{"error":"forbidden","message":"missing or wrong bearer token"}"#,
    );
    assert_eq!(e.to_string(), "missing or wrong bearer token");
    assert_eq!(e.status(), Some(403));
    match e {
        ClientError::Server { code, .. } => assert_eq!(code, "forbidden"),
        other => panic!("{other:?}"),
    }
    // Classic shape carries "status":"error" too.
    let e = client::server_error(
        reqwest::StatusCode::CONFLICT,
        br#"{"status":"error","error":"conflict","message":"key k exists"}"#,
    );
    assert_eq!(e.to_string(), "key k exists");
    // Not JSON: status and a bit of the body, on one line.
    let e = client::server_error(reqwest::StatusCode::BAD_GATEWAY, b"upstream\nbroke");
    assert_eq!(e.to_string(), "HTTP 502 Bad Gateway: upstream broke");
    let e = client::server_error(reqwest::StatusCode::INTERNAL_SERVER_ERROR, b"");
    assert_eq!(e.to_string(), "HTTP 500 Internal Server Error");
    let e = client::server_error(reqwest::StatusCode::NOT_FOUND, br#"{"error":"not_found"}"#);
    assert_eq!(e.to_string(), "not_found (HTTP 404)");
}

fn parse(args: &[&str]) -> Cli {
    Cli::try_parse_from(std::iter::once("kvctl").chain(args.iter().copied())).unwrap()
}

#[test]
fn global_flags_parse_anywhere() {
    let c = parse(&[
        "get",
        "k",
        "--endpoint",
        "http://n:1",
        "--token",
        "t",
        "--consistency",
        "all",
        "-o",
        "json",
    ]);
    assert_eq!(c.endpoint, "http://n:1");
    assert_eq!(c.token.as_deref(), Some("t"));
    assert_eq!(c.consistency, Some(Level::All));
    assert_eq!(Consistency::from(Level::All), Consistency::All);
    assert_eq!(c.output, Output::Json);
    assert!(matches!(c.command, Command::Get { ref key } if key == "k"));
    let c = parse(&["--output", "human", "nodes"]);
    assert_eq!(c.output, Output::Human);
    assert!(matches!(c.command, Command::Nodes { .. }));
}

#[test]
fn put_takes_a_value_stdin_or_a_file() {
    let src = |args: &[&str]| match parse(args).command {
        Command::Put(p) => p.source(),
        other => panic!("{other:?}"),
    };
    assert_eq!(src(&["put", "k", "v"]), ValueSource::Literal(b"v".to_vec()));
    assert_eq!(src(&["put", "k", ""]), ValueSource::Literal(Vec::new()));
    assert_eq!(src(&["put", "k", "-"]), ValueSource::Stdin);
    assert_eq!(src(&["put", "k", "--file", "-"]), ValueSource::Stdin);
    assert_eq!(
        src(&["put", "k", "--file", "/tmp/x"]),
        ValueSource::File("/tmp/x".into())
    );
    assert!(matches!(parse(&["put", "k", "v", "--create"]).command, Command::Put(p) if p.create));
    for bad in [
        &["put", "k"][..],
        &["put", "k", "v", "--file", "f"],
        &["put"],
        &["get"],
        &["fail", "x"],
        &["strategy", "ring"],
        &["strategy", "full", "--replication-factor", "0"],
        &["--consistency", "some", "get", "k"],
        &["-o", "xml", "nodes"],
        &["bench", "--read-ratio", "1.5"],
        &["bench", "--duration", "10x"],
        &["bench", "--ops", "5", "--duration", "1s"],
    ] {
        let r = Cli::try_parse_from(std::iter::once("kvctl").chain(bad.iter().copied()));
        assert!(r.is_err(), "{bad:?} should not parse");
    }
}

#[test]
fn control_commands_parse() {
    assert!(matches!(
        parse(&["fail", "2"]).command,
        Command::Fail {
            node: 2,
            force: false,
            ..
        }
    ));
    assert!(matches!(
        parse(&["recover", "0"]).command,
        Command::Recover { node: 0, .. }
    ));
    match parse(&[
        "strategy",
        "consistent-hashing",
        "--replication-factor",
        "2",
    ])
    .command
    {
        Command::Strategy {
            strategy,
            replication_factor,
            wait,
        } => {
            assert_eq!(strategy, StrategyArg::ConsistentHashing);
            assert_eq!(strategy.classic_name(), "consistent");
            assert_eq!(replication_factor, Some(2));
            assert_eq!(wait.query(), "timeout=30");
        }
        other => panic!("{other:?}"),
    }
    // Control calls wait for their effect unless told not to.
    match parse(&["recover", "1", "--no-wait"]).command {
        Command::Recover { wait, .. } => {
            assert_eq!(wait.query(), "wait=false");
            assert_eq!(
                wait.request_timeout(std::time::Duration::from_secs(10)),
                std::time::Duration::from_secs(10)
            );
        }
        other => panic!("{other:?}"),
    }
    match parse(&["fail", "1", "--wait-timeout", "2.5"]).command {
        Command::Fail { wait, .. } => {
            assert_eq!(wait.query(), "timeout=2.5");
            assert_eq!(
                wait.request_timeout(std::time::Duration::from_secs(10)),
                std::time::Duration::from_millis(12_500)
            );
        }
        other => panic!("{other:?}"),
    }
    for bad in [
        &["fail", "1", "--wait-timeout", "0"][..],
        &["fail", "1", "--no-wait", "--wait-timeout", "5"][..],
    ] {
        assert!(
            Cli::try_parse_from(std::iter::once("kvctl").chain(bad.iter().copied())).is_err(),
            "{bad:?} was accepted"
        );
    }
    match parse(&["strategy", "consistent"]).command {
        Command::Strategy { strategy, .. } => assert_eq!(strategy, StrategyArg::ConsistentHashing),
        other => panic!("{other:?}"),
    }
    match parse(&["strategy", "full"]).command {
        Command::Strategy { strategy, .. } => assert_eq!(strategy.classic_name(), "full"),
        other => panic!("{other:?}"),
    }
    match parse(&["list", "--prefix", "a/", "--limit", "5"]).command {
        Command::List { prefix, limit } => {
            assert_eq!(prefix.as_deref(), Some("a/"));
            assert_eq!(limit, Some(5));
        }
        other => panic!("{other:?}"),
    }
}

fn topo(strategy: Strategy, factor: u32, n: u32) -> Topology {
    Topology {
        cluster_id: "demo".into(),
        epoch: 7,
        read_consistency: Consistency::Quorum,
        write_consistency: Consistency::Quorum,
        placement: PlacementSpec {
            strategy,
            factor,
            members: (0..n).collect(),
        },
        pending: None,
        nodes: (0..n)
            .map(|i| NodeInfo {
                ordinal: i,
                address: format!("127.0.0.1:{}", 7400 + 10 * i),
                peer_address: format!("127.0.0.1:{}", 7401 + 10 * i),
                state: NodeState::Up,
            })
            .collect(),
    }
}

#[test]
fn nodes_render_as_a_table() {
    let mut t = topo(Strategy::ConsistentHashing, 2, 3);
    t.pending = Some(PlacementSpec {
        strategy: Strategy::ConsistentHashing,
        factor: 3,
        members: vec![0, 1, 2],
    });
    let rows = vec![
        NodeRow {
            ordinal: 0,
            address: "127.0.0.1:7400".into(),
            state: NodeState::Up,
            reachable: true,
            resync_progress: Some(1.0),
            synced_epoch: Some(7),
            hints_pending: Some(0),
            error: None,
        },
        NodeRow {
            ordinal: 1,
            address: "127.0.0.1:7410".into(),
            state: NodeState::Recovering,
            reachable: true,
            resync_progress: Some(0.4299),
            synced_epoch: Some(5),
            hints_pending: Some(12),
            error: None,
        },
        NodeRow {
            ordinal: 2,
            address: "127.0.0.1:7420".into(),
            state: NodeState::Failed,
            reachable: false,
            resync_progress: None,
            synced_epoch: None,
            hints_pending: None,
            error: Some("refused".into()),
        },
    ];
    let s = output::render_nodes(&t, &rows);
    let lines: Vec<&str> = s.lines().collect();
    assert_eq!(
        lines[0],
        "cluster demo  epoch 7  placement ConsistentHashing factor 2 over nodes 0,1,2  read Quorum  write Quorum"
    );
    assert_eq!(
        lines[1],
        "rebalancing to ConsistentHashing factor 3 over nodes 0,1,2"
    );
    assert_eq!(
        lines[2],
        "ORDINAL  ADDRESS         STATE       RESYNC       HINTS"
    );
    assert_eq!(
        lines[3],
        "0        127.0.0.1:7400  Up          100%         0"
    );
    assert_eq!(
        lines[4],
        "1        127.0.0.1:7410  Recovering  42%          12"
    );
    assert_eq!(
        lines[5],
        "2        127.0.0.1:7420  Failed      unreachable  -"
    );
    let json = serde_json::to_value(&rows[2]).unwrap();
    assert_eq!(json["reachable"], false);
    assert!(json.get("resyncProgress").is_none());
}

#[test]
fn small_renderings() {
    assert_eq!(output::percent(0.0), "0%");
    assert_eq!(output::percent(0.999), "99%");
    assert_eq!(output::percent(1.0), "100%");
    assert_eq!(output::percent(f64::NAN), "-");
    assert_eq!(output::table(&[]), "");
    assert_eq!(
        output::render_ack(
            "stored",
            &WriteAck {
                key: "k".into(),
                version: "123.0".into()
            }
        ),
        "stored k (version 123.0)\n"
    );
    let p = PlacementInfo {
        key: "user/1".into(),
        bucket: 17,
        owners: vec![
            Owner {
                ordinal: 0,
                address: "h:1".into(),
                state: Some(NodeState::Up),
            },
            Owner {
                ordinal: 2,
                address: "h:3".into(),
                state: Some(NodeState::Failed),
            },
        ],
        pending_owners: None,
    };
    assert_eq!(
        output::render_placement(&p),
        "key user/1  bucket 17\nowners: 0 (h:1 Up), 2 (h:3 Failed)\n"
    );
    let v = output::value_json("k", b"hello", Some("1.0"));
    assert_eq!(
        v,
        serde_json::json!({"key":"k","value":"hello","version":"1.0"})
    );
    let v = output::value_json("k", &[0xff, 0x00], None);
    assert_eq!(v, serde_json::json!({"key":"k","valueHex":"ff00"}));
}

fn d(sum: u128, count: u64) -> BucketDigest {
    BucketDigest { sum, count }
}

#[test]
fn verify_reports_buckets_whose_co_owners_differ() {
    let t = topo(Strategy::ConsistentHashing, 2, 3);
    let layout = kv_core::Layout::of(&t);
    // Everyone holds the same thing in buckets 0..10 they own...
    let mut all: BTreeMap<u32, NodeDigests> = BTreeMap::new();
    for n in 0..3 {
        let mut m = NodeDigests::new();
        for b in 0..10 {
            if layout.read_owners(b).contains(&n) {
                m.insert(b, d(u128::from(b) * 31 + 5, u64::from(b) + 1));
            }
        }
        // ...plus leftovers of a bucket it does not own, which do not count.
        let foreign = (0..kv_core::BUCKETS)
            .find(|b| !layout.read_owners(*b).contains(&n))
            .unwrap();
        m.insert(foreign, d(99, 9));
        all.insert(n, m);
    }
    let r = verify::compare(&t, &all);
    assert!(r.consistent(), "{r:?}");
    assert_eq!(r.buckets_compared, kv_core::BUCKETS);
    assert!(r.unchecked_owners.is_empty());

    // One owner of bucket 3 misses a record; another owner of bucket 5 lacks it entirely.
    let o3 = layout.read_owners(3).to_vec();
    all.get_mut(&o3[1]).unwrap().insert(3, d(1, 1));
    let o5 = layout.read_owners(5).to_vec();
    all.get_mut(&o5[0]).unwrap().remove(&5);
    let r = verify::compare(&t, &all);
    let buckets: Vec<u32> = r.divergent.iter().map(|x| x.bucket).collect();
    assert_eq!(buckets, vec![3, 5]);
    let b5 = &r.divergent[1];
    assert!(
        b5.owners
            .iter()
            .any(|(o, g)| *o == o5[0] && *g == BucketDigest::EMPTY)
    );
    let mut sorted = o5.clone();
    sorted.sort();
    assert_eq!(b5.owners.iter().map(|x| x.0).collect::<Vec<_>>(), sorted);

    // Without node 1's digests, its buckets compare only where two others own them.
    all.remove(&1);
    let r = verify::compare(&t, &all);
    assert_eq!(r.unchecked_owners.into_iter().collect::<Vec<_>>(), vec![1]);
    assert!(r.buckets_single > 0);
    assert_eq!(r.buckets_compared + r.buckets_single, kv_core::BUCKETS);
}

#[test]
fn verify_full_placement_compares_every_node() {
    let t = topo(Strategy::Full, 1, 3);
    let mut all: BTreeMap<u32, NodeDigests> = (0..3).map(|n| (n, NodeDigests::new())).collect();
    assert!(verify::compare(&t, &all).consistent());
    all.get_mut(&2).unwrap().insert(4095, d(7, 1));
    let r = verify::compare(&t, &all);
    assert_eq!(r.divergent.len(), 1);
    assert_eq!(r.divergent[0].bucket, 4095);
    assert_eq!(r.divergent[0].owners.len(), 3);
    let text = output::render_verify(&r, &[(3, "Failed".into())]);
    assert!(
        text.starts_with("node 3: not checked (Failed)\nbucket 4095 differs:\n"),
        "{text}"
    );
    assert!(text.contains("  node 2: 1 records, digest 00000000000000000000000000000007\n"));
    assert!(
        text.ends_with("4096 buckets compared, 1 differ\n"),
        "{text}"
    );
}

#[test]
fn digests_parse_from_the_wire_shape() {
    let raw = r#"{"nodeId":1,"epoch":3,"buckets":{"0":{"digest":"ff","count":2},
        "4095":{"digest":"0x00000000000000000000000000000001","count":1}}}"#;
    let resp: DigestsResponse = serde_json::from_str(raw).unwrap();
    let m = resp.parse().unwrap();
    assert_eq!(m[&0], d(255, 2));
    assert_eq!(m[&4095], d(1, 1));
    let bad = |bucket: &str, digest: &str| {
        DigestsResponse {
            node_id: 0,
            epoch: 0,
            buckets: [(
                bucket.to_string(),
                WireDigest {
                    digest: digest.into(),
                    count: 1,
                },
            )]
            .into(),
        }
        .parse()
    };
    assert!(bad("4096", "1").is_err());
    assert!(bad("x", "1").is_err());
    assert!(bad("1", "zz").is_err());
    assert!(bad("1", "").is_err());
    assert!(bad("1", &"f".repeat(33)).is_err());
    assert!(bad("1", &"f".repeat(32)).is_ok());
}
