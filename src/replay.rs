//! `segmenter replay`: run the engine over an NDJSON file with the event clock, no Kafka.
//!
//! Uses the same decoder, engine and RocksDB store as the service, so a replay is a faithful
//! preview of what the service would publish for the same input.

use std::io::{BufRead, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::decode::Decoder;
use crate::engine::{ClockMode, EngineConfig, EngineError, Outcome, PartitionEngine};
use crate::model::{Change, Millis};
use crate::rules::Program;
use crate::store::rocks::{RocksOptions, RocksStore};
use crate::store::StoreError;

/// Events between two write-backs of state to RocksDB (the engine's cache bound keeps memory
/// in check between them).
const FLUSH_EVERY: u64 = 250_000;

/// Counts reported at the end of a replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReplaySummary {
    /// Non-blank input lines.
    pub read: u64,
    pub rejected: u64,
    pub duplicates: u64,
    pub changes: u64,
    pub timers_fired: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("reading input: {0}")]
    Input(std::io::Error),
    #[error("writing output: {0}")]
    Output(std::io::Error),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a replay needs besides its input and outputs.
pub struct ReplayJob<'a> {
    pub program: Arc<Program>,
    pub decoder: Decoder,
    pub engine: EngineConfig,
    pub state_dir: &'a Path,
    pub until: Option<Millis>,
}

/// Replays `input` (NDJSON), writing change events to `out` and rejected lines to `diagnostics`.
pub fn replay(
    job: ReplayJob<'_>,
    input: impl BufRead,
    mut out: impl Write,
    mut diagnostics: impl Write,
) -> Result<(ReplaySummary, Duration), ReplayError> {
    let started = Instant::now();
    let store = Arc::new(RocksStore::open(job.state_dir, RocksOptions::default())?);
    let config = EngineConfig {
        clock: ClockMode::Event,
        ..job.engine
    };
    let mut engine = PartitionEngine::open(0, job.program, store, config)?;
    let mut summary = ReplaySummary::default();
    let mut changes: Vec<Change> = Vec::new();
    let mut line = Vec::with_capacity(1024);
    let mut input = input;
    let mut line_number = 0u64;
    loop {
        line.clear();
        let read = input
            .read_until(b'\n', &mut line)
            .map_err(ReplayError::Input)?;
        if read == 0 {
            break;
        }
        line_number += 1;
        let trimmed = trim_line(&line);
        if trimmed.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        summary.read += 1;
        let event = match job.decoder.decode(trimmed) {
            Ok(event) => event,
            Err(err) => {
                summary.rejected += 1;
                writeln!(diagnostics, "line {line_number}: {err}").map_err(ReplayError::Output)?;
                continue;
            }
        };
        if engine.apply_event(&event, &mut changes)? == Outcome::Duplicate {
            summary.duplicates += 1;
        }
        write_changes(&mut out, &mut changes, &mut summary)?;
        if summary.read % FLUSH_EVERY == 0 {
            engine.flush()?;
        }
    }
    if let Some(until) = job.until {
        engine.advance(until, &mut changes)?;
        write_changes(&mut out, &mut changes, &mut summary)?;
    }
    engine.flush()?;
    out.flush().map_err(ReplayError::Output)?;
    summary.timers_fired = engine.stats().timers_fired;
    Ok((summary, started.elapsed()))
}

fn write_changes(
    out: &mut impl Write,
    changes: &mut Vec<Change>,
    summary: &mut ReplaySummary,
) -> Result<(), ReplayError> {
    for change in changes.drain(..) {
        summary.changes += 1;
        let json = change.to_json();
        out.write_all(json.as_bytes())
            .map_err(ReplayError::Output)?;
        out.write_all(b"\n").map_err(ReplayError::Output)?;
    }
    Ok(())
}

fn trim_line(line: &[u8]) -> &[u8] {
    let mut end = line.len();
    while end > 0 && matches!(line[end - 1], b'\n' | b'\r') {
        end -= 1;
    }
    &line[..end]
}

impl ReplaySummary {
    /// The one-line summary printed on stderr.
    pub fn line(&self, elapsed: Duration) -> String {
        let seconds = elapsed.as_secs_f64().max(1e-9);
        format!(
            "replay: read {} events, rejected {}, duplicates dropped {}, changes {}, timers fired {}, {:.0} events/s ({:.3} s)",
            self.read,
            self.rejected,
            self.duplicates,
            self.changes,
            self.timers_fired,
            self.read as f64 / seconds,
            seconds
        )
    }
}
