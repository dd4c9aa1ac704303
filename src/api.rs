//! What the HTTP routes answer (SPEC §8), independent of HTTP: readiness, metrics, segment and
//! customer lookups, paged members, preview, erasure and explanations. Reads go to RocksDB
//! (every micro-batch is committed there, so it is current to the last batch); erasure goes
//! through the partition's worker so it is ordered with that partition's input.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use crate::engine::{decode_stored, ClockMode, EngineError};
use crate::features::CustomerState;
use crate::metrics::ROCKSDB_PROPERTIES;
use crate::model::time::format_rfc3339;
use crate::model::{Change, Millis};
use crate::pipeline::{Dispatcher, Shared};
use crate::rules::error::line_col;
use crate::rules::explain::format_duration;
use crate::rules::program::FeatureLayout;
use crate::rules::{compile, evaluate_dirty, explain, Program, SegmentDef};
use crate::settings::PreviewLimits;
use crate::store::codec::{self, StateLayout};
use crate::store::{keys, Store, StoreError, Table};

/// A failed request, mapped to an HTTP status by the server.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    /// Well-formed but not answerable (e.g. a preview needing data that is not kept).
    #[error("{0}")]
    Unprocessable(String),
    /// Not ready, busy, or the partition moved: try again.
    #[error("{0}")]
    Unavailable(String),
    /// Too many requests of this kind at once (previews): try again shortly.
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    Internal(String),
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        ApiError::Internal(error.to_string())
    }
}

impl From<EngineError> for ApiError {
    fn from(error: EngineError) -> Self {
        ApiError::Internal(error.to_string())
    }
}

/// Longest page of members.
pub const MAX_PAGE: usize = 1000;
/// Longest preview sample.
pub const MAX_SAMPLE: usize = 100;
/// How long an erasure waits for the partition's worker.
const ERASE_TIMEOUT: Duration = Duration::from_secs(10);

/// The service as the HTTP API sees it.
pub struct ServiceApi {
    shared: Arc<Shared>,
    dispatcher: Arc<Dispatcher>,
    layout: StateLayout,
    old_layouts: Mutex<HashMap<u64, StateLayout>>,
    preview_limits: PreviewLimits,
    /// Previews running now; at most `preview_limits.concurrency` (see [`PreviewSlot`]).
    previews_running: AtomicUsize,
}

/// A taken preview slot; released when dropped.
struct PreviewSlot<'a>(&'a AtomicUsize);

impl Drop for PreviewSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ServiceApi {
    pub fn new(shared: Arc<Shared>, dispatcher: Arc<Dispatcher>) -> ServiceApi {
        ServiceApi {
            layout: StateLayout::of(&shared.program),
            shared,
            dispatcher,
            old_layouts: Mutex::new(HashMap::new()),
            preview_limits: PreviewLimits::default(),
            previews_running: AtomicUsize::new(0),
        }
    }

    /// Bounds previews: how many run at once, how many stored states each reads.
    pub fn with_preview_limits(mut self, limits: PreviewLimits) -> ServiceApi {
        self.preview_limits = limits;
        self
    }

    /// A preview slot, or `Busy` when every slot is taken.
    fn preview_slot(&self) -> Result<PreviewSlot<'_>, ApiError> {
        let limit = self.preview_limits.concurrency;
        let taken =
            self.previews_running
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |running| {
                    (running < limit).then_some(running + 1)
                });
        match taken {
            Ok(_) => Ok(PreviewSlot(&self.previews_running)),
            Err(_) => Err(ApiError::Busy(format!(
                "{limit} preview(s) already running (http.preview_concurrency): try again shortly"
            ))),
        }
    }

    fn program(&self) -> &Program {
        &self.shared.program
    }

    /// `Ok` when every assigned partition is restored and consuming.
    pub fn ready(&self) -> Result<(), String> {
        self.shared.ready()
    }

    /// The Prometheus text, with the scrape-time figures (RocksDB, readiness) refreshed.
    pub fn metrics_text(&self) -> String {
        let metrics = &self.shared.metrics;
        for (label, property) in ROCKSDB_PROPERTIES {
            let value = self.shared.store.property_sum(property);
            metrics
                .rocksdb
                .with_label_values(&[label])
                .set(value.min(i64::MAX as u64) as i64);
        }
        metrics.ready.set(i64::from(self.ready().is_ok()));
        metrics.render()
    }

    /// Every segment: definition, version and current members (in this instance's partitions).
    pub fn segments(&self) -> Value {
        let program = self.program();
        let segments: Vec<Value> = program
            .segments
            .iter()
            .map(|segment| {
                json!({
                    "id": segment.id,
                    "description": segment.description,
                    "rule": segment.canonical,
                    "version": segment.version,
                    "time_dependent": segment.time_dependent,
                    "members": self
                        .shared
                        .metrics
                        .segment_members
                        .with_label_values(&[segment.id.as_str()])
                        .get(),
                })
            })
            .collect();
        json!({
            "definitions_version": program.version,
            "partitions": self.shared.owned_partitions(),
            "segments": segments,
        })
    }

    /// The logical "now" of a partition: the wall clock, or its event clock in event mode.
    fn now(&self, partition: u32) -> Result<Millis, ApiError> {
        let wall = (self.shared.clock)();
        if self.shared.engine.clock == ClockMode::Wall {
            return Ok(wall);
        }
        let stored = self
            .shared
            .store
            .get(Table::Meta, &keys::clock(partition))?;
        match stored {
            Some(bytes) => codec::decode_i64(&bytes).map_err(|err| {
                ApiError::Internal(format!("partition {partition}: corrupt clock: {err}"))
            }),
            None => Ok(wall),
        }
    }

    /// The owned partition holding a customer's state, and the state.
    fn find(&self, customer: &str) -> Result<Option<(u32, CustomerState)>, ApiError> {
        for partition in self.shared.owned_partitions() {
            let partition = partition as u32;
            let key = keys::customer(partition, customer);
            if let Some(bytes) = self.shared.store.get(Table::Customers, &key)? {
                let state = self.decode(partition, customer, &bytes, &self.layout)?;
                return Ok(Some((partition, state)));
            }
        }
        Ok(None)
    }

    fn decode(
        &self,
        partition: u32,
        customer: &str,
        bytes: &[u8],
        layout: &StateLayout,
    ) -> Result<CustomerState, ApiError> {
        let mut old_layouts = self
            .old_layouts
            .lock()
            .map_err(|_| ApiError::Internal("layout cache lock poisoned".into()))?;
        Ok(decode_stored(
            self.shared.store.as_ref(),
            layout,
            &mut old_layouts,
            partition,
            customer,
            bytes,
        )?)
    }

    /// The customer's segments (with `since`) and behavioural state.
    pub fn customer(&self, customer: &str) -> Result<Value, ApiError> {
        let (partition, state) = self.unknown_is_404(customer)?;
        let program = self.program();
        let segments: Vec<Value> = program
            .segments
            .iter()
            .zip(&state.memberships)
            .filter(|(_, m)| m.member)
            .map(|(segment, m)| {
                json!({
                    "segment": segment.id,
                    "since": format_rfc3339(m.since),
                    "seq": m.seq,
                })
            })
            .collect();
        Ok(json!({
            "customer_id": customer,
            "partition": partition,
            "segments": segments,
            "state": describe_state(&program.layout, &state),
            "next_check": state.timer.map(format_rfc3339),
            "evaluated_at": state.evaluated_at.map(format_rfc3339),
        }))
    }

    fn unknown_is_404(&self, customer: &str) -> Result<(u32, CustomerState), ApiError> {
        if customer.is_empty() {
            return Err(ApiError::BadRequest("empty customer id".into()));
        }
        self.find(customer)?.ok_or_else(|| {
            ApiError::NotFound(format!(
                "customer '{customer}' is not known in the partitions this instance owns"
            ))
        })
    }

    /// Members of a segment in customer-id order, `limit` after the customer id `after`.
    pub fn members(
        &self,
        segment: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Value, ApiError> {
        if self.program().segment_index(segment).is_none() {
            return Err(ApiError::NotFound(format!("no segment '{segment}'")));
        }
        if limit == 0 || limit > MAX_PAGE {
            return Err(ApiError::BadRequest(format!(
                "limit must be between 1 and {MAX_PAGE}"
            )));
        }
        let mut found: Vec<(String, Millis)> = Vec::new();
        for partition in self.shared.owned_partitions() {
            let partition = partition as u32;
            let prefix = keys::members_prefix(partition, segment);
            let start = after.map(|after| keys::member(partition, segment, after));
            let page =
                self.shared
                    .store
                    .scan_page(Table::Members, &prefix, start.as_deref(), limit)?;
            for (key, value) in page {
                let Some(customer) = keys::parse_member(&key, prefix.len()) else {
                    continue;
                };
                let since = codec::decode_i64(&value).map_err(|err| {
                    ApiError::Internal(format!(
                        "partition {partition}: corrupt members index entry of {segment}/{customer}: {err}"
                    ))
                })?;
                found.push((customer.to_string(), since));
            }
        }
        found.sort();
        let more = found.len() >= limit;
        found.truncate(limit);
        let next = if more {
            found.last().map(|(customer, _)| customer.clone())
        } else {
            None
        };
        let members: Vec<Value> = found
            .iter()
            .map(|(customer, since)| json!({"customer_id": customer, "since": format_rfc3339(*since)}))
            .collect();
        Ok(json!({"segment": segment, "members": members, "next": next}))
    }

    /// Compiles `rule` next to the current definitions and counts who would be in it now.
    /// Read-only. Refused (422) if the rule needs per-customer data the current definitions do
    /// not keep, since the answer would be wrong rather than approximate. At most
    /// `preview_limits.concurrency` run at once (`Busy` beyond); each reads at most
    /// `preview_limits.max_scan` stored states and says whether it read them all (`complete`).
    pub fn preview(&self, rule: &str, sample: usize) -> Result<Value, ApiError> {
        if sample > MAX_SAMPLE {
            return Err(ApiError::BadRequest(format!(
                "sample must be at most {MAX_SAMPLE}"
            )));
        }
        let _slot = self.preview_slot()?;
        let max_scan = self.preview_limits.max_scan;
        let program = self.program();
        let preview_id = "__preview";
        let mut defs: Vec<SegmentDef> = program
            .segments
            .iter()
            .map(|segment| SegmentDef {
                id: segment.id.clone(),
                description: segment.description.clone(),
                rule: segment.rule_text.clone(),
            })
            .collect();
        defs.push(SegmentDef {
            id: preview_id.into(),
            description: None,
            rule: rule.to_string(),
        });
        let extended = compile(&defs).map_err(|errors| {
            let messages: Vec<String> = errors
                .iter()
                .map(|e| {
                    let (line, column) = line_col(rule, e.error.span.start);
                    format!("{line}:{column}: {}", e.error.message)
                })
                .collect();
            ApiError::BadRequest(format!("invalid rule: {}", messages.join("; ")))
        })?;
        let missing = missing_features(&program.layout, &extended.layout);
        if !missing.is_empty() {
            return Err(ApiError::Unprocessable(format!(
                "the rule needs per-customer data the current segments do not keep: {}. Add a \
                 segment that uses it; its history starts then",
                missing.join(", ")
            )));
        }
        let idx = extended.segments.len() - 1;
        let layout = StateLayout::of(&extended);
        let mut members = 0u64;
        let mut customers = 0u64;
        let mut sampled = Vec::new();
        let mut failure = None;
        let mut evaluated_at = None;
        let mut complete = true;
        for partition in self.shared.owned_partitions() {
            if !complete {
                break;
            }
            let partition = partition as u32;
            let now = self.now(partition)?;
            evaluated_at = Some(evaluated_at.map_or(now, |at: Millis| at.max(now)));
            let prefix = keys::partition_prefix(partition);
            self.shared
                .store
                .for_each_prefix(Table::Customers, &prefix, &mut |key, bytes| {
                    let Some(customer) = keys::parse_customer(key) else {
                        return true;
                    };
                    if customers >= max_scan {
                        complete = false;
                        return false;
                    }
                    let state = match self.decode(partition, customer, bytes, &layout) {
                        Ok(state) => state,
                        Err(error) => {
                            failure = Some(error);
                            return false;
                        }
                    };
                    customers += 1;
                    let mut dirty = vec![false; extended.segments.len()];
                    dirty[idx] = true;
                    let evaluation = evaluate_dirty(&extended, &state, customer, now, dirty);
                    if evaluation.members[idx] {
                        members += 1;
                        if sampled.len() < sample {
                            sampled.push(customer.to_string());
                        }
                    }
                    true
                })?;
            if let Some(error) = failure.take() {
                return Err(error);
            }
        }
        Ok(json!({
            "rule": extended.segments[idx].canonical,
            "members": members,
            "customers": customers,
            "sample": sampled,
            "complete": complete,
            "max_scan": (!complete).then_some(max_scan),
            "at": evaluated_at.map(format_rfc3339),
            "partitions": self.shared.owned_partitions(),
        }))
    }

    /// Erases a customer (GDPR) through its partition's worker; the exits it published.
    pub fn erase(&self, customer: &str) -> Result<Vec<Change>, ApiError> {
        let (partition, _) = self.unknown_is_404(customer)?;
        match self
            .dispatcher
            .erase(partition as i32, customer, ERASE_TIMEOUT)
        {
            Ok(Some(exits)) => Ok(exits),
            Ok(None) => Err(ApiError::NotFound(format!(
                "customer '{customer}' is not known"
            ))),
            Err(reason) => Err(ApiError::Unavailable(reason)),
        }
    }

    /// Why the customer is or is not in `segment`.
    pub fn explain(&self, customer: &str, segment: &str) -> Result<Value, ApiError> {
        let program = self.program();
        let idx = program
            .segment_index(segment)
            .ok_or_else(|| ApiError::NotFound(format!("no segment '{segment}'")))?;
        let (partition, state) = self.unknown_is_404(customer)?;
        let now = self.now(partition)?;
        let explanation = explain(
            program,
            &state,
            customer,
            now,
            idx,
            self.shared.engine.lookahead_steps,
        );
        let membership = &state.memberships[idx];
        Ok(json!({
            "customer_id": customer,
            "segment": segment,
            "at": format_rfc3339(now),
            "member": membership.member,
            "since": (membership.seq > 0).then(|| format_rfc3339(membership.since)),
            "rule_holds": explanation.member,
            "rule": explanation.rule,
            "next_change": explanation.next_change.map(format_rfc3339),
        }))
    }
}

/// What `extended` reads that `current` does not keep (or keeps for too short a window).
fn missing_features(current: &FeatureLayout, extended: &FeatureLayout) -> Vec<String> {
    let have = current.descriptors();
    let want = extended.descriptors();
    let mut missing = Vec::new();
    for (idx, name) in want.series.iter().enumerate() {
        let kept = have.series.iter().position(|n| n == name);
        let needed = extended.series[idx].retention;
        match kept {
            None => missing.push(format!("per-event history of {}", readable(name))),
            Some(at) if current.series[at].retention < needed => missing.push(format!(
                "{} of history of {} (kept: {})",
                format_duration(needed as f64),
                readable(name),
                format_duration(current.series[at].retention as f64)
            )),
            Some(_) => {}
        }
    }
    for name in &want.totals {
        if !have.totals.contains(name) {
            missing.push(format!("all-time totals of {}", readable(name)));
        }
    }
    for name in &want.extremes {
        if !have.extremes.contains(name) {
            missing.push(format!("first/last time of {name}"));
        }
    }
    for name in &want.traits {
        if !have.traits.contains(name) {
            missing.push(format!("trait {name}"));
        }
    }
    missing
}

/// `"Order Completed"|"revenue"` → `"Order Completed" (revenue)`.
fn readable(descriptor: &str) -> String {
    match descriptor.rsplit_once('|') {
        Some((events, "-")) => events.to_string(),
        Some((events, property)) => format!("{events} ({})", property.trim_matches('"')),
        None => descriptor.to_string(),
    }
}

/// The stored aggregates, named by what they aggregate.
fn describe_state(layout: &FeatureLayout, state: &CustomerState) -> Value {
    let matcher = |idx: usize| layout.matchers.get(idx).map_or("?", |m| m.text.as_str());
    let property = |path: &Option<Vec<String>>| path.as_ref().map(|p| p.join("."));
    let windows: Vec<Value> = layout
        .series
        .iter()
        .zip(&state.series)
        .map(|(spec, series)| {
            let events: u64 = series.entries.iter().map(|e| u64::from(e.count)).sum();
            json!({
                "events": matcher(spec.matcher),
                "property": property(&spec.property),
                "kept_ms": spec.retention,
                "count": events,
                "oldest": series.entries.first().map(|e| format_rfc3339(e.ts)),
                "newest": series.entries.last().map(|e| format_rfc3339(e.ts)),
            })
        })
        .collect();
    let totals: Vec<Value> = layout
        .totals
        .iter()
        .zip(&state.totals)
        .map(|(spec, total)| {
            json!({
                "events": matcher(spec.matcher),
                "property": property(&spec.property),
                "count": total.count,
                "sum": (total.values > 0).then_some(total.sum),
                "min": (total.values > 0).then_some(total.min),
                "max": (total.values > 0).then_some(total.max),
            })
        })
        .collect();
    let times: Vec<Value> = layout
        .extremes
        .iter()
        .zip(&state.extremes)
        .map(|(m, extreme)| {
            json!({
                "events": matcher(*m),
                "first": extreme.first.map(format_rfc3339),
                "last": extreme.last.map(format_rfc3339),
            })
        })
        .collect();
    let traits: serde_json::Map<String, Value> = layout
        .traits
        .iter()
        .zip(&state.traits)
        .filter_map(|(name, value)| value.as_ref().map(|v| (name.clone(), v.value.clone())))
        .collect();
    json!({
        "windows": windows,
        "totals": totals,
        "first_last": times,
        "traits": traits,
        "remembered_message_ids": state.seen.len(),
    })
}
