//! Tells Service owners what the data plane did with their objects: each [`Warning`] becomes a
//! Warning Event on its Service and a log line, sent when it appears or its message changes.
//!
//! ```text
//!   sync loop ──(all current warnings, every sync)──> WarningEvents::publish
//!        └─ new or changed since the last publish (pure: `fresh`) ──> log line
//!                                                                 └─> channel ──> task ──> Event
//! ```
//!
//! Publishing never waits for the API server: the Events go through a channel to a task of their
//! own, so a slow or absent API server never holds up a sync. A warning that goes away and comes
//! back is reported again.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::{ObjectReference, Service};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use tokio::sync::mpsc;

use super::model::{ServiceKey, Warning};

/// The Events' reporting controller (the speaker's field manager name).
const REPORTER: &str = "ferrolb-speaker";

/// Where warnings go. Cloning shares the record of what was already reported.
#[derive(Clone, Debug)]
pub struct WarningEvents {
    /// Warnings reported last time, keyed by service and reason, with their message.
    reported: Arc<Mutex<BTreeMap<(ServiceKey, &'static str), String>>>,
    /// To the Event task; `None`: log lines only (tests, and a speaker without an API client).
    events: Option<mpsc::UnboundedSender<Warning>>,
}

impl WarningEvents {
    /// Log lines only, no Events.
    pub fn logs_only() -> Self {
        Self { reported: Arc::default(), events: None }
    }

    /// Sends Events through `client` as `node`'s speaker; `services` finds the Services' uids.
    pub fn start(client: kube::Client, node: String, services: Store<Service>) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<Warning>();
        let recorder = Recorder::new(
            client,
            Reporter { controller: REPORTER.into(), instance: Some(crate::status::reporting_instance(&node)) },
        );
        tokio::spawn(async move {
            while let Some(w) = rx.recv().await {
                let uid = services
                    .get(&ObjectRef::new(&w.service.name).within(&w.service.namespace))
                    .and_then(|s| s.metadata.uid.clone());
                let reference = ObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Service".into()),
                    namespace: Some(w.service.namespace.clone()),
                    name: Some(w.service.name.clone()),
                    uid,
                    ..Default::default()
                };
                let ev = Event {
                    type_: EventType::Warning,
                    reason: w.reason.into(),
                    note: Some(note(&w.message)),
                    action: "Program".into(),
                    secondary: None,
                };
                if let Err(e) = recorder.publish(&ev, &reference).await {
                    tracing::warn!(service = %w.service, reason = w.reason, error = %e, "cannot send a Warning Event");
                }
            }
        });
        Self { reported: Arc::default(), events: Some(tx) }
    }

    /// Takes the complete list of current warnings: logs and sends those that are new or changed.
    pub fn publish(&self, warnings: impl IntoIterator<Item = Warning>) {
        let Ok(mut reported) = self.reported.lock() else { return };
        let (fresh, now) = fresh(&reported, warnings);
        *reported = now;
        drop(reported);
        for w in fresh {
            tracing::warn!(service = %w.service, reason = w.reason, message = %w.message, "service warning");
            if let Some(tx) = &self.events {
                let _ = tx.send(w);
            }
        }
    }

    /// Whether `service` has a current warning with `reason`.
    pub fn has(&self, service: &ServiceKey, reason: &str) -> bool {
        self.reported.lock().is_ok_and(|r| r.keys().any(|(s, r)| s == service && *r == reason))
    }
}

/// The warnings of `current` that were not in `reported` with the same message, and the new record.
fn fresh(
    reported: &BTreeMap<(ServiceKey, &'static str), String>,
    current: impl IntoIterator<Item = Warning>,
) -> (Vec<Warning>, BTreeMap<(ServiceKey, &'static str), String>) {
    let current: BTreeSet<Warning> = current.into_iter().collect();
    let mut now = BTreeMap::new();
    let mut out = Vec::new();
    for w in current {
        let key = (w.service.clone(), w.reason);
        if now.contains_key(&key) {
            continue; // Two messages for one reason (e.g. both families): the first is enough.
        }
        if reported.get(&key) != Some(&w.message) {
            out.push(w.clone());
        }
        now.insert(key, w.message);
    }
    (out, now)
}

/// An Event note is limited to 1 KiB by the API server: longer messages are cut at a character
/// boundary.
fn note(message: &str) -> String {
    const MAX: usize = 1000;
    if message.len() <= MAX {
        return message.to_owned();
    }
    let mut end = MAX;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &message[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(name: &str, reason: &'static str, message: &str) -> Warning {
        Warning { service: ServiceKey::new("t", name), reason, message: message.into() }
    }

    #[test]
    fn only_new_or_changed_warnings_are_reported() {
        let (out, rec) = fresh(&BTreeMap::new(), [w("a", "R", "m"), w("b", "R", "m")]);
        assert_eq!(out.len(), 2);
        let (out, rec) = fresh(&rec, [w("a", "R", "m"), w("b", "R", "m2")]);
        assert_eq!(out, [w("b", "R", "m2")]);
        let (out, rec) = fresh(&rec, [w("b", "R", "m2")]);
        assert!(out.is_empty());
        let (out, _) = fresh(&rec, [w("a", "R", "m"), w("b", "R", "m2")]);
        assert_eq!(out, [w("a", "R", "m")], "a warning that comes back is reported again");
    }

    #[test]
    fn notes_are_cut_at_a_character_boundary() {
        let long = "é".repeat(800);
        let n = note(&long);
        assert!(n.len() <= 1004 && n.ends_with('…'));
    }
}
