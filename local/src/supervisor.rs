//! The supervisor: once per tick it reaps processes, asks every running
//! node for its report, plans, and carries out the plan; and it says which
//! nodes clients may be routed to.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kv_core::{NodeState, Topology};

use crate::state::{now_ms, write_atomic};
use crate::{Inner, Platform};
use kv_control::planner::{self, Desired, NodeObservation, NodeProgress, Observed, Plan};
use kv_control::{Observation, Step};

/// How often the supervisor plans.
const TICK: Duration = Duration::from_millis(250);

impl Platform {
    fn observed(&self, inner: &Inner, now: u64) -> Observed {
        let mut nodes = BTreeMap::new();
        let ordinals: BTreeSet<u32> = inner
            .procs
            .keys()
            .chain(inner.down_since.keys())
            .chain(inner.reports.keys())
            .chain(
                inner
                    .topology
                    .iter()
                    .flat_map(|t| t.nodes.iter().map(|n| &n.ordinal)),
            )
            .copied()
            .collect();
        for o in ordinals {
            nodes.insert(
                o,
                NodeObservation {
                    running: inner.procs.contains_key(&o),
                    down_since_ms: inner.down_since.get(&o).copied(),
                    report: inner.reports.get(&o).cloned(),
                },
            );
        }
        Observed {
            cluster_id: inner.saved.cluster_id.clone(),
            topology: inner.topology.clone(),
            epoch_floor: inner.saved.epoch_floor,
            now_ms: now,
            nodes,
        }
    }

    /// Would the planner accept `desired` now? (A dry run for the control routes.)
    pub fn check_desired(&self, inner: &Inner, desired: &Desired) -> Result<(), String> {
        let plan = planner::plan(desired, &self.observed(inner, now_ms()), &self.config);
        match plan.refusal {
            Some(r) => Err(r.reason),
            None => Ok(()),
        }
    }

    /// Runs the supervisor until `stop` flips; then stops every node.
    pub async fn supervise(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        loop {
            self.tick().await;
            tokio::select! {
                _ = tokio::time::sleep(TICK) => {}
                _ = stop.changed() => break,
            }
        }
        self.shutdown().await;
    }

    /// One round of kv-control's loop: reap, observe, plan, act.
    pub async fn tick(&self) {
        let mut round = Round {
            platform: self,
            started: Instant::now(),
            desired: None,
            committed: None,
        };
        let Ok(_) = kv_control::step(&mut round).await;
    }

    fn reap(&self) {
        let mut inner = self.lock();
        let now = now_ms();
        let mut exited = Vec::new();
        for (o, p) in inner.procs.iter_mut() {
            if let Ok(Some(status)) = p.child.try_wait() {
                exited.push((*o, status, p.expected_exit));
            }
        }
        for (o, status, expected) in exited {
            inner.procs.remove(&o);
            inner.reports.remove(&o);
            inner.answered.remove(&o);
            if expected {
                inner.down_since.entry(o).or_insert(now);
            } else {
                // A crash is a definite failure: Failed now, restarted next.
                let since = now.saturating_sub(self.opts.failure_detection_ms);
                inner.down_since.insert(o, since);
                self.say(format!("node {o}: process exited on its own ({status}); it will be restarted and catch up"));
            }
        }
    }

    /// Ordinal, client port and peer port of every running node.
    pub(super) fn running_ports(&self) -> Vec<(u32, u16, u16)> {
        let inner = self.lock();
        inner
            .procs
            .keys()
            .filter_map(|o| inner.saved.ports.get(o).map(|(c, p)| (*o, *c, *p)))
            .collect()
    }

    async fn poll_reports(&self) {
        let targets: Vec<(u32, String)> = self
            .running_ports()
            .into_iter()
            .map(|(o, c, _)| (o, format!("{}://127.0.0.1:{c}/v1/cluster", self.scheme())))
            .collect();
        let token = self.tokens.client.current();
        let mut answers = Vec::new();
        let futs = targets.into_iter().map(|(o, url)| {
            let req = self.http.get(url).bearer_auth(&token);
            async move {
                let r = match req.send().await {
                    Ok(resp) if resp.status().is_success() => {
                        resp.json::<kv_core::NodeReport>().await.ok()
                    }
                    _ => None,
                };
                (o, r)
            }
        });
        for (o, v) in futures::future::join_all(futs).await {
            // a node whose store is new or rebuilt gets no client traffic
            // until it has caught up (its acknowledgements do not count yet)
            let catching_up = v.as_ref().is_some_and(|r| r.store_catching_up);
            answers.push((o, v.as_ref().map(NodeProgress::from), catching_up));
        }
        let mut inner = self.lock();
        let now = now_ms();
        for (o, report, catching_up) in answers {
            match report {
                Some(r) => {
                    inner.down_since.remove(&o);
                    // Unless it was killed or restarted while it was asked.
                    if inner.procs.contains_key(&o) && !catching_up {
                        inner.answered.insert(o);
                    } else if catching_up {
                        inner.answered.remove(&o);
                    }
                    if catching_up {
                        inner.catching_up.insert(o);
                    } else {
                        inner.catching_up.remove(&o);
                    }
                    inner.reports.insert(o, r);
                }
                None => {
                    inner.reports.remove(&o);
                    // A process just started gets a grace of one failure-detection period.
                    inner.down_since.entry(o).or_insert(now);
                }
            }
        }
    }

    fn announce(&self, plan: &Plan) {
        for t in &plan.transitions {
            let from = t.from.map_or("new".to_string(), |s| s.to_string());
            self.say(format!(
                "node {}: {from} -> {} ({})",
                t.ordinal, t.to, t.reason
            ));
        }
        if let Some(rb) = plan.rebalance {
            self.say(format!("rebalance: {rb:?}"));
        }
    }

    /// Keeps `t` where nodes read it at start and where a restarted `kvctl
    /// up` finds it. The gateway shows it (and routes by it) only once the
    /// round's push is done ([`Round::finish`]): a client told a node is Up
    /// then finds every node knowing it.
    fn commit_topology(&self, t: &Topology) {
        let mut inner = self.lock();
        inner.saved.epoch_floor = inner.saved.epoch_floor.max(t.epoch);
        if let Err(e) = self.save(&inner) {
            tracing::error!(error = %e, "cannot save the cluster state");
        }
        let json = serde_json::to_vec_pretty(t).unwrap_or_default();
        if let Err(e) = write_atomic(&self.opts.data_dir.join("topology.json"), &json) {
            tracing::error!(error = %e, "cannot write the topology file");
        }
    }

    fn print_progress(&self, plan: &Plan) {
        let mut lines = Vec::new();
        {
            let mut inner = self.lock();
            for n in &plan.nodes {
                if let (Some(p), NodeState::Recovering | NodeState::Joining) =
                    (n.resync_progress, n.state)
                {
                    let pct = (p * 100.0).floor() as u32;
                    let last = inner.printed_progress.insert(n.ordinal, pct);
                    if last.is_none_or(|l| pct >= l + 10 || (pct == 100 && l != 100)) {
                        lines.push(format!(
                            "node {}: {} {pct}%",
                            n.ordinal,
                            if n.state == NodeState::Joining {
                                "streaming"
                            } else {
                                "catching up"
                            }
                        ));
                    }
                } else {
                    inner.printed_progress.remove(&n.ordinal);
                }
            }
        }
        for l in lines {
            self.say(l);
        }
    }

    async fn push(&self, t: &Topology) {
        let targets: Vec<String> = self
            .running_ports()
            .into_iter()
            .map(|(_, _, p)| format!("{}://127.0.0.1:{p}/internal/v1/topology", self.scheme()))
            .collect();
        let token = self.tokens.cluster.current();
        let body = serde_json::to_vec(t).unwrap_or_default();
        let futs = targets.into_iter().map(|url| {
            self.http
                .put(url)
                .bearer_auth(&token)
                .header("x-kv-epoch", t.epoch)
                .body(body.clone())
                .send()
        });
        // Nodes also read the file; a failed push is caught up from there.
        let _ = futures::future::join_all(futs).await;
    }

    /// The nodes clients may be routed to: Up (or Leaving) in the topology,
    /// running, and answering since they were started.
    pub fn serving_nodes(&self) -> Vec<(u32, String)> {
        let inner = self.lock();
        let Some(t) = &inner.topology else {
            return Vec::new();
        };
        t.nodes
            .iter()
            .filter(|n| {
                n.state.serves_client_reads()
                    && inner.procs.contains_key(&n.ordinal)
                    && inner.answered.contains(&n.ordinal)
            })
            .map(|n| (n.ordinal, n.address.clone()))
            .collect()
    }
}

/// One tick as kv-control's loop sees the local platform. Nothing it does
/// fails the round: a node that cannot be started or told is seen again at
/// the next tick, 250 ms later.
struct Round<'a> {
    platform: &'a Platform,
    started: Instant,
    /// The desired cluster this round planned, for the held-down count.
    desired: Option<Desired>,
    /// The topology committed this round, shown once the actions are done.
    committed: Option<Topology>,
}

impl kv_control::Platform for Round<'_> {
    type Error = std::convert::Infallible;

    async fn observe(&mut self) -> Result<Option<Observation>, Self::Error> {
        let p = self.platform;
        p.reap();
        p.poll_reports().await;
        let inner = p.lock();
        let desired = inner.saved.desired();
        self.desired = Some(desired.clone());
        Ok(Some(Observation {
            desired,
            observed: p.observed(&inner, now_ms()),
            config: p.config.clone(),
        }))
    }

    async fn prepare(&mut self, plan: &Plan, _: &Observed) -> Result<(), Self::Error> {
        self.platform.announce(plan);
        self.platform.print_progress(plan);
        Ok(())
    }

    async fn commit(&mut self, topology: &Topology, changed: bool) -> Result<(), Self::Error> {
        if changed {
            self.platform.commit_topology(topology);
            self.committed = Some(topology.clone());
        }
        Ok(())
    }

    async fn kill(&mut self, ordinal: u32) -> Result<(), Self::Error> {
        self.platform.kill(ordinal).await;
        Ok(())
    }

    async fn push(&mut self, topology: &Topology) -> Result<(), Self::Error> {
        self.platform.push(topology).await;
        Ok(())
    }

    async fn stop(&mut self, ordinal: u32) -> Result<(), Self::Error> {
        self.platform.stop(ordinal).await;
        Ok(())
    }

    async fn start(&mut self, ordinal: u32) -> Result<(), Self::Error> {
        self.platform.start(ordinal);
        Ok(())
    }

    async fn finish(&mut self, step: &Step, _: &Observed) -> Result<(), Self::Error> {
        let p = self.platform;
        let Some(plan) = step.plan() else {
            return Ok(());
        };
        if matches!(step, Step::Refused(_)) {
            p.print_progress(plan);
        }
        let mut inner = p.lock();
        if let Some(t) = self.committed.take() {
            inner.topology = Some(t);
        }
        inner.last_plan = Some(plan.clone());
        drop(inner);
        // Failed nodes held down by `kvctl fail`: a drill, not a failure.
        let held = self.desired.as_ref().map_or(0, |d| {
            d.held_down(plan.nodes.iter().map(|n| (n.ordinal, n.state)))
        });
        p.metrics.record_tick(self.started, plan, held);
        Ok(())
    }
}
