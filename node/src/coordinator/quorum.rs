//! One fan-out for every quorum the coordinator waits for: ask owners,
//! count the good answers, return as soon as the quorum is met.
//!
//! The calls run inside the coordinator's own task while it waits (no task
//! spawned and no wake-up handed across tasks per owner, on every write and
//! read). A call still in flight when the quorum is met, or when the waiting
//! request is dropped (its client went away), is moved to a task of its own
//! and runs to its end: a write's hint for an owner that fails late is still
//! stored, and its answer arrives on [`Replies::late`] (read repair). How
//! one owner is called is a closure, so the quorum rules are tested with
//! in-memory owners (`quorum_tests`).

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::sync::mpsc;

/// How long a read waits for an owner before also asking the next one.
pub(crate) const SPECULATIVE_READ_AFTER: Duration = Duration::from_millis(100);

/// Whom a fan-out asks, and when it asks more.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Fanout {
    /// Owners asked at the start; each failure asks the next in order.
    first: usize,
    /// With no answer for this long, the next owner is asked as well.
    speculate_after: Option<Duration>,
}

impl Fanout {
    /// Every owner at once (writes and create steps).
    pub fn all() -> Fanout {
        Fanout {
            first: usize::MAX,
            speculate_after: None,
        }
    }

    /// Exactly `need` owners, the next one when one fails or has not
    /// answered within [`SPECULATIVE_READ_AFTER`] (as Cassandra's
    /// speculative retry): a partitioned or stalled owner then costs that
    /// delay, not the peer timeout.
    pub fn read(need: usize) -> Fanout {
        Fanout {
            first: need,
            speculate_after: Some(SPECULATIVE_READ_AFTER),
        }
    }
}

/// Counts good answers towards the quorum(s) a request needs.
pub(crate) trait Tally<T> {
    fn add(&mut self, owner: u32, reply: &T);
    fn met(&self) -> bool;
}

/// `need` good answers from any of the owners asked (reads).
#[derive(Debug)]
pub(crate) struct Count {
    pub need: usize,
    pub got: usize,
}

impl Count {
    pub fn new(need: usize) -> Count {
        Count { need, got: 0 }
    }
}

impl<T> Tally<T> for Count {
    fn add(&mut self, _: u32, _: &T) {
        self.got += 1;
    }

    fn met(&self) -> bool {
        self.got >= self.need
    }
}

/// What a fan-out saw until its quorum was met or could no longer be.
pub(crate) struct Replies<T, E> {
    pub met: bool,
    /// Good answers, in the order they arrived.
    pub ok: Vec<(u32, T)>,
    /// Failed owners with why, in the order they failed.
    pub failed: Vec<(u32, E)>,
    /// Owners asked because others were slow.
    pub speculated: u64,
    /// Answers of the calls still running.
    pub late: mpsc::UnboundedReceiver<(u32, Result<T, E>)>,
}

type Call<T, E> = Pin<Box<dyn Future<Output = (u32, Result<T, E>)> + Send>>;

/// Calls under way to some of the owners, the rest waiting their turn.
pub(crate) struct Calls<T, E, F>
where
    T: Send + 'static,
    E: Send + 'static,
{
    call: F,
    queue: std::vec::IntoIter<u32>,
    /// Calls under way, polled by the waiting task itself.
    running: FuturesUnordered<Call<T, E>>,
    speculate_after: Option<Duration>,
    speculated: u64,
}

impl<T, E, F, Fut> Calls<T, E, F>
where
    T: Send + 'static,
    E: Send + 'static,
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = Result<T, E>> + Send + 'static,
{
    /// Makes the first calls; they run while [`Calls::until`] waits.
    pub fn start(owners: Vec<u32>, how: Fanout, call: F) -> Self {
        let mut calls = Calls {
            call,
            queue: owners.into_iter(),
            running: FuturesUnordered::new(),
            speculate_after: how.speculate_after,
            speculated: 0,
        };
        for _ in 0..how.first {
            if !calls.ask_next() {
                break;
            }
        }
        calls
    }

    fn ask_next(&mut self) -> bool {
        let Some(owner) = self.queue.next() else {
            return false;
        };
        let reply = (self.call)(owner);
        self.running
            .push(Box::pin(async move { (owner, reply.await) }));
        true
    }

    /// Waits until `tally` is met, or until no call is left that could
    /// meet it.
    pub async fn until(mut self, tally: &mut impl Tally<T>) -> Replies<T, E> {
        let (mut ok, mut failed) = (Vec::new(), Vec::new());
        // Without speculation the timer is never polled; its length is moot.
        let patience = self.speculate_after.unwrap_or(Duration::from_secs(3600));
        let speculate = tokio::time::sleep(patience);
        tokio::pin!(speculate);
        while !tally.met() && !self.running.is_empty() {
            let (owner, reply) = tokio::select! {
                Some(answer) = self.running.next() => answer,
                () = &mut speculate, if self.speculate_after.is_some() => {
                    if self.ask_next() {
                        self.speculated += 1;
                    }
                    speculate.as_mut().reset(tokio::time::Instant::now() + patience);
                    continue;
                }
                // not reached: `running` is not empty
                else => break,
            };
            match reply {
                Ok(r) => {
                    tally.add(owner, &r);
                    ok.push((owner, r));
                }
                Err(e) => {
                    failed.push((owner, e));
                    self.ask_next();
                }
            }
        }
        let late = self.detach();
        Replies {
            met: tally.met(),
            ok,
            failed,
            speculated: self.speculated,
            late,
        }
    }
}

impl<T, E, F> Calls<T, E, F>
where
    T: Send + 'static,
    E: Send + 'static,
{
    /// Moves the calls still under way to a task of their own, where they
    /// run to their end whatever the caller does next; their answers arrive
    /// on the channel returned.
    fn detach(&mut self) -> mpsc::UnboundedReceiver<(u32, Result<T, E>)> {
        let (tx, late) = mpsc::unbounded_channel();
        // Without a runtime (it is shutting down) nothing could run them.
        if !self.running.is_empty()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            let mut running = std::mem::take(&mut self.running);
            rt.spawn(async move {
                while let Some(answer) = running.next().await {
                    let _ = tx.send(answer);
                }
            });
        }
        late
    }
}

impl<T, E, F> Drop for Calls<T, E, F>
where
    T: Send + 'static,
    E: Send + 'static,
{
    /// A request dropped while it waited (its client went away) still lets
    /// its calls run to their end, as if they had had tasks of their own.
    fn drop(&mut self) {
        let _ = self.detach();
    }
}
