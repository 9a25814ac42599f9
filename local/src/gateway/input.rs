//! What a control call asks for, checked before anything changes: its query
//! (`force`, `wait`, `timeout`) and a replication change's body.

use std::time::Duration;

use kv_core::{Consistency, Strategy};
use serde_json::Value;

/// How long a control call waits for its effect unless told (`?timeout=`).
pub const DEFAULT_WAIT: Duration = Duration::from_secs(30);
/// The longest `?timeout=` accepted.
const MAX_WAIT: Duration = Duration::from_secs(3600);

/// Why a control call changed nothing.
pub(super) enum Refused {
    /// 400: the request itself is wrong.
    Bad(String),
    /// 404: no such node.
    NotFound(String),
    /// 409: the planner refuses the change now.
    Conflict(String),
}

/// A control call's query: `force=true|false` (fail only),
/// `wait=true|false`, `timeout=SECONDS`.
pub(super) struct ControlQuery {
    pub(super) force: bool,
    /// `None`: answer as soon as the change is accepted (`wait=false`).
    pub(super) wait: Option<Duration>,
}

impl ControlQuery {
    pub(super) fn parse(query: &str, force_allowed: bool) -> Result<ControlQuery, Refused> {
        let flag = |name: &str, v: &str| match v {
            "true" | "1" | "" => Ok(true),
            "false" | "0" => Ok(false),
            _ => Err(Refused::Bad(format!(
                "{name} must be true or false, not {v:?}"
            ))),
        };
        let (mut force, mut wait, mut timeout) = (false, true, None);
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            match name {
                "force" if force_allowed => force = flag(name, value)?,
                "wait" => wait = flag(name, value)?,
                "timeout" => {
                    let secs = value
                        .strip_suffix('s')
                        .unwrap_or(value)
                        .parse::<f64>()
                        .ok()
                        .filter(|s| s.is_finite() && *s > 0.0 && *s <= MAX_WAIT.as_secs_f64())
                        .ok_or_else(|| {
                            Refused::Bad(format!(
                                "timeout must be a number of seconds in (0, {}], not {value:?}",
                                MAX_WAIT.as_secs()
                            ))
                        })?;
                    timeout = Some(Duration::from_secs_f64(secs));
                }
                _ => {
                    let known = if force_allowed {
                        "force, wait, timeout"
                    } else {
                        "wait, timeout"
                    };
                    return Err(Refused::Bad(format!(
                        "unknown query parameter {name:?} (this route takes {known})"
                    )));
                }
            }
        }
        Ok(ControlQuery {
            force,
            wait: wait.then(|| timeout.unwrap_or(DEFAULT_WAIT)),
        })
    }
}

/// A replication change as `/set_replication_strategy` and `PUT
/// /v1/replication` take it: `{"strategy": "full"|"consistent",
/// "replication_factor": N, "readConsistency": .., "writeConsistency": ..}`
/// (`factor` is accepted for `replication_factor`). Every mistake is refused
/// with a message naming it; nothing is half-applied.
#[derive(Debug, Default, PartialEq)]
pub struct ReplicationChange {
    pub strategy: Option<Strategy>,
    pub factor: Option<u32>,
    pub read: Option<Consistency>,
    pub write: Option<Consistency>,
}

impl ReplicationChange {
    /// Checks `v` against a cluster of `replicas` nodes whose strategy is
    /// `current`.
    pub fn parse(v: &Value, current: Strategy, replicas: u32) -> Result<ReplicationChange, String> {
        const FIELDS: &str = "strategy, replication_factor, readConsistency, writeConsistency";
        let Some(obj) = v.as_object() else {
            return Err(format!(
                "the body must be a JSON object such as {{\"strategy\": \"consistent\", \"replication_factor\": 2}}, not {}",
                kind_of(v)
            ));
        };
        if let Some(k) = obj.keys().find(|k| {
            !matches!(
                k.as_str(),
                "strategy"
                    | "replication_factor"
                    | "factor"
                    | "readConsistency"
                    | "writeConsistency"
            )
        }) {
            return Err(format!("unknown field {k:?} (the fields are {FIELDS})"));
        }
        if obj.contains_key("replication_factor") && obj.contains_key("factor") {
            return Err("give replication_factor or factor, not both".into());
        }
        let mut change = ReplicationChange::default();
        match obj.get("strategy") {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) => {
                change.strategy =
                    Some(s.parse::<Strategy>().map_err(|_| {
                        format!("unknown strategy {s:?} (\"full\" or \"consistent\")")
                    })?)
            }
            Some(other) => {
                return Err(format!(
                    "strategy must be a string, \"full\" or \"consistent\", not {}",
                    kind_of(other)
                ));
            }
        }
        match obj.get("replication_factor").or_else(|| obj.get("factor")) {
            None | Some(Value::Null) => {}
            Some(Value::Number(n)) => {
                let f = match (n.as_i64(), n.as_u64()) {
                    (_, Some(f)) => f,
                    (Some(f), None) => {
                        return Err(format!("replication_factor must be at least 1, not {f}"));
                    }
                    (None, None) => {
                        return Err(format!(
                            "replication_factor must be a whole number, not {n}"
                        ));
                    }
                };
                if f == 0 {
                    return Err("replication_factor must be at least 1, not 0".into());
                }
                change.factor = Some(u32::try_from(f).map_err(|_| {
                    format!("replication_factor {f} is larger than the cluster ({replicas} nodes)")
                })?);
            }
            Some(other) => {
                return Err(format!(
                    "replication_factor must be a whole number, not {}",
                    kind_of(other)
                ));
            }
        }
        for (name, slot) in [
            ("readConsistency", &mut change.read),
            ("writeConsistency", &mut change.write),
        ] {
            match obj.get(name) {
                None | Some(Value::Null) => {}
                Some(Value::String(s)) => {
                    *slot = Some(
                        s.parse()
                            .map_err(|_| format!("{name} must be One, Quorum or All, not {s:?}"))?,
                    )
                }
                Some(other) => {
                    return Err(format!(
                        "{name} must be a string, One, Quorum or All, not {}",
                        kind_of(other)
                    ));
                }
            }
        }
        if change == ReplicationChange::default() {
            return Err(format!("nothing to change: give at least one of {FIELDS}"));
        }
        // Full keeps every key on every node: a factor means something only
        // with consistent hashing.
        let strategy = change.strategy.unwrap_or(current);
        if let (Strategy::Full, Some(f)) = (strategy, change.factor)
            && f != replicas
        {
            return Err(format!(
                "replication_factor applies only to consistent hashing: Full keeps every key on all {replicas} nodes (give \"strategy\": \"consistent\" with a factor)"
            ));
        }
        Ok(change)
    }
}

/// A JSON value's kind, for messages.
fn kind_of(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => format!("the string {s:?}"),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kv_core::Strategy;

    fn parse(body: &str, current: Strategy) -> Result<ReplicationChange, String> {
        ReplicationChange::parse(&serde_json::from_str(body).unwrap(), current, 3)
    }

    #[test]
    fn each_kind_of_replication_mistake_is_named() {
        use Strategy::{ConsistentHashing as Ch, Full};
        for (body, current, says) in [
            (r#"{"strategy":1}"#, Full, "strategy must be a string"),
            (r#"{"strategy":true}"#, Full, "not the boolean true"),
            ("[]", Full, "not an array"),
            ("null", Full, "not null"),
            (r#"{"strategy":"ring"}"#, Full, "unknown strategy \"ring\""),
            (
                r#"{"replication_factor":-1,"strategy":"consistent"}"#,
                Full,
                "at least 1, not -1",
            ),
            (
                r#"{"replication_factor":0,"strategy":"consistent"}"#,
                Full,
                "at least 1, not 0",
            ),
            (r#"{"replication_factor":2.5}"#, Ch, "whole number, not 2.5"),
            (
                r#"{"replication_factor":"2"}"#,
                Ch,
                "whole number, not the string",
            ),
            (
                r#"{"replication_factor":5000000000}"#,
                Ch,
                "larger than the cluster",
            ),
            (r#"{"replication_factor":2,"factor":2}"#, Ch, "not both"),
            (
                r#"{"strategy":"full","replication_factor":1}"#,
                Full,
                "only to consistent",
            ),
            (
                r#"{"strategy":"full","replication_factor":2}"#,
                Ch,
                "only to consistent",
            ),
            (r#"{"replication_factor":2}"#, Full, "only to consistent"),
            (
                r#"{"readConsistency":"most"}"#,
                Full,
                "One, Quorum or All, not \"most\"",
            ),
            (
                r#"{"writeConsistency":[]}"#,
                Full,
                "writeConsistency must be a string",
            ),
            (r#"{"replicas":5}"#, Full, "unknown field \"replicas\""),
            ("{}", Full, "nothing to change"),
            (r#"{"strategy":null}"#, Full, "nothing to change"),
        ] {
            match parse(body, current) {
                Ok(c) => panic!("{body} was accepted as {c:?}"),
                Err(m) => assert!(m.contains(says), "{body}: {m:?} does not say {says:?}"),
            }
        }
    }

    #[test]
    fn valid_replication_changes_are_read_as_given() {
        let c = parse(
            r#"{"strategy":"consistent","replication_factor":2}"#,
            Strategy::Full,
        );
        assert_eq!(
            c,
            Ok(ReplicationChange {
                strategy: Some(Strategy::ConsistentHashing),
                factor: Some(2),
                ..Default::default()
            })
        );
        // Full with its own factor (every node) is true, so accepted.
        let c = parse(
            r#"{"strategy":"full","replication_factor":3}"#,
            Strategy::ConsistentHashing,
        );
        assert_eq!(c.map(|c| c.factor), Ok(Some(3)));
        let c = parse(r#"{"factor":1}"#, Strategy::ConsistentHashing);
        assert_eq!(c.map(|c| c.factor), Ok(Some(1)));
        let c = parse(r#"{"writeConsistency":"all"}"#, Strategy::Full);
        assert_eq!(c.map(|c| c.write), Ok(Some(Consistency::All)));
    }

    #[test]
    fn control_queries_bound_the_wait() {
        let q = |s: &str| ControlQuery::parse(s, true).map(|q| (q.force, q.wait));
        assert!(matches!(q(""), Ok((false, Some(DEFAULT_WAIT)))));
        assert!(matches!(q("wait=false"), Ok((false, None))));
        assert!(
            matches!(q("force=true&timeout=2.5"), Ok((true, Some(d))) if d == Duration::from_millis(2500))
        );
        assert!(matches!(q("timeout=5s"), Ok((false, Some(d))) if d == Duration::from_secs(5)));
        for bad in [
            "timeout=0",
            "timeout=-1",
            "timeout=x",
            "timeout=99999",
            "wait=maybe",
            "forse=true",
        ] {
            assert!(q(bad).is_err(), "{bad} accepted");
        }
        assert!(ControlQuery::parse("force=true", false).is_err());
    }
}
