//! A deadline that a busy session loop can push back without touching the timer wheel
//! (CMXSAFE change 8).
//!
//! The server session loop pushed its keepalive back after every packet (`Sleep::reset`, which
//! takes the timer driver's lock and moves the entry in the wheel) and built a new rekey `Sleep`
//! every turn (registered when polled, deregistered when dropped). Under small messages that was
//! a few percent of the gateway's CPU, to move deadlines that almost never fire. Here a new
//! deadline is only recorded; the armed `Sleep` keeps the old one. When it fires early it is
//! re-armed to the recorded deadline, once per interval instead of once per packet. A deadline
//! brought forward re-arms at once.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::time::{Instant, Sleep};

#[derive(Default)]
pub(crate) struct LazyDeadline {
    /// When it is due; `None` never is.
    deadline: Option<Instant>,
    /// Armed on first poll, at or before `deadline`, or later than it only until the next poll.
    sleep: Option<Pin<Box<Sleep>>>,
}

impl LazyDeadline {
    pub(crate) fn new(deadline: Option<Instant>) -> Self {
        LazyDeadline {
            deadline,
            sleep: None,
        }
    }

    /// Records when it is due; costs nothing until the next poll, and nothing then if the
    /// deadline moved back.
    pub(crate) fn set(&mut self, deadline: Option<Instant>) {
        self.deadline = deadline;
    }

    /// Resolves once the deadline has passed; pending forever while there is none.
    pub(crate) fn elapsed(&mut self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| self.poll_elapsed(cx))
    }

    fn poll_elapsed(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(deadline) = self.deadline else {
            return Poll::Pending;
        };
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        loop {
            if sleep.deadline() > deadline {
                sleep.as_mut().reset(deadline);
            }
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            if sleep.deadline() >= deadline {
                return Poll::Ready(());
            }
            // Fired at a deadline that has since been pushed back.
            sleep.as_mut().reset(deadline);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_pushed_back_deadline_fires_at_the_new_time_not_the_old() {
        let start = Instant::now();
        let mut d = LazyDeadline::new(Some(start + Duration::from_millis(20)));
        // Armed at the first deadline.
        assert!(
            tokio::time::timeout(Duration::from_millis(1), d.elapsed())
                .await
                .is_err()
        );
        let later = start + Duration::from_millis(120);
        d.set(Some(later));
        d.elapsed().await;
        assert!(Instant::now() >= later, "fired before its pushed-back deadline");
    }

    #[tokio::test]
    async fn a_deadline_brought_forward_fires_at_once() {
        let mut d = LazyDeadline::new(Some(Instant::now() + Duration::from_secs(3600)));
        assert!(
            tokio::time::timeout(Duration::from_millis(1), d.elapsed())
                .await
                .is_err()
        );
        let soon = Instant::now() + Duration::from_millis(10);
        d.set(Some(soon));
        tokio::time::timeout(Duration::from_secs(30), d.elapsed())
            .await
            .expect("a deadline brought forward still waited for the old one");
        assert!(Instant::now() >= soon);
    }

    #[tokio::test]
    async fn no_deadline_never_fires_and_a_new_one_after_firing_is_waited_for() {
        let mut d = LazyDeadline::new(None);
        assert!(
            tokio::time::timeout(Duration::from_millis(30), d.elapsed())
                .await
                .is_err()
        );
        d.set(Some(Instant::now()));
        d.elapsed().await;
        let next = Instant::now() + Duration::from_millis(40);
        d.set(Some(next));
        d.elapsed().await;
        assert!(Instant::now() >= next, "an elapsed timer was taken for the next deadline");
    }
}
